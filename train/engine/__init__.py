"""The engine under the three training commands: options and CLI, the training loop, optimizer, torchrun set-up, plots."""
