"""Evaluation of an encoder: the timm classifier it loads into, frozen features, the k-NN monitor, the logistic probe."""
