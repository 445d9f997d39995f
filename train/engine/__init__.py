"""The engine under the three training commands: options and CLI, the one training loop, optimizer, torchrun
set-up, plots."""
