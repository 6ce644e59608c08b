"""`opticam finetune`: the paper's medical models (App. E) trained on Ray Train from ingested
samples. Modules: config (the YAML), data (samples in, checks, decoded splits), train (the loop,
under Ray Train or in one process), driver (TorchTrainer, outputs), cli (argparse glue)."""
