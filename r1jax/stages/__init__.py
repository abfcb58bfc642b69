"""The stages of the R1 recipe, one readable module each (see `r1jax.launch`).

pretrain -> (rl as R1-Zero) | sft (cold start) -> rl (reasoning RL) -> rejection_sampling -> sft (of
the base model) -> rl (all scenarios); distill trains a smaller student on the kept samples; eval
scores any checkpoint; pipeline runs the whole recipe.
"""
