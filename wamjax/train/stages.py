"""Names of the training stages, in the order a `stage=all` run executes them."""

STAGES = ("video_pretrain", "action_tune")
