"""Stage 1: a frozen backbone over a dataset into a store (preprocessing, augmented views,
attention maps). The only stage that loads models and datasets."""
