"""From logits to tokens: sampling parameters and logit adjustments (params), position-keyed
noise (keyed), the acceptance rule that keeps speculation exact (accept), and
log-probabilities (logprobs). Pure functions of tensors: nothing here runs a model."""
