"""Model plumbing: loading checkpoints and hashing them (loading), running a causal LM as calibration windows
(workload) or one decoder block at a time (stream), what MoE experts read (expert_inputs), probes over
torch.distributed (distributed), and the local zoo of random-init model families (zoo)."""
