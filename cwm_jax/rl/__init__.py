"""cwm_jax.rl: RL post-training with verifiable rewards (CWM's GRPO variant).

rewards   verifiers: sandboxed hidden tests, exact answers, trace prediction (+1 / -1)
tasks     the embedded task set (code, math, trace, toy; 'digits' for from-scratch tests)
grpo      group advantages, the clip-higher token loss, the jitted RL step
rollout   G samples per prompt with old-policy log-probs, batches, async staleness
loop      `run(config, workdir)`: the RL stage (`trainer='rl'` in a stage schedule)
"""
