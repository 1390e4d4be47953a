"""The cloud side: verify sealed batches, account for every seq, acknowledge what is held.

It depends on `edge_agent.seal` (the opener) and `edge_agent.errors`, nothing else of the agent,
so the cloud team can read and deploy it alone.
"""
