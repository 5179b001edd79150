"""The TMEM memory agent: memory-writing mode, prompt-space channels, LoCoMo evaluation, the demo.

Entry points: `tmem_runtime.agent.evaluate.main` (`tmem eval`), `tmem_runtime.agent.demo.main` (`tmem demo`).
"""
