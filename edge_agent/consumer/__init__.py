"""The cloud side: verify sealed batches, account for every seq, acknowledge what is held.

It depends on `edge_agent.seal` (the opener), `edge_agent.errors` and `edge_agent.reading` (the
value rules it checks readings against), nothing else of the agent, so the cloud team can read
and deploy it alone.
"""
