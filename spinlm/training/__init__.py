"""Training plumbing shared by the SFT, SPIN and DPO stages: how the model is spread over processes (strategy),
checkpoints, LoRA, a step's forwards, guards."""
