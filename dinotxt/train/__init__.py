"""Training stack (imports Lightning): the LightningModule system, the datamodule and
``run_training``, which turns a resolved recipe into a run folder."""
