"""`tmem ablate`: the paper's design claims re-measured on the embedded model (issue 12).

    drift.py       collateral damage: KL of the next-token distribution on neutral prompts
    spectrum.py    B's gradient along each singular direction vs sigma_i (the preconditioning claim)
    stats.py       percentile bootstrap intervals (means, paired differences)
    capacity.py    capacity bookkeeping: write plans, replay, recall of each write, facts held
    runs.py        adapter configurations, one write-and-recall run, the JSON checkpoint
    studies.py     the five studies, resumable
    report.py      tables, verdict inputs and PNG plots from the checkpoints
    command.py     the command line
"""
