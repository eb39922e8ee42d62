"""Training a GPT with Lightning: the LightningModule (module.py), its optimizers (optim.py), the train.py command line
(cli.py), checkpoints, FSDP and throughput; safety/ holds the nets that keep a run from being lost."""
