"""cwm_jax.rl: RL post-training with verifiable rewards (CWM's GRPO variant).

tasks     the embedded task set (code, math, trace, toy; 'digits' for from-scratch tests)
grpo      group advantages, the clip-higher token loss, the jitted RL step
rollout   G samples per prompt with old-policy log-probs, batches, async staleness
loop      `run(config, workdir)`: the RL stage (`trainer='rl'` in a stage schedule)

The verifiers (+1 / -1) are `cwm_jax.infer.rewards`, shared with the benchmarks.
"""
