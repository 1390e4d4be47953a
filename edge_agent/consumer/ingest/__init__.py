"""`edge-agent ingest`: the fleet's consumer, from an MQTT broker into PostgreSQL (docs/cloud.md).

One module per job:

- `settings`  the worker's settings, from the command line and an optional YAML file
- `schema`    the tables, views and versioned migrations (`ingest migrate`)
- `keystore`  gateway public keys in the database (`ingest keys add|retire|list`), loaded as a
              TrustSet by the worker
- `decode`    one MQTT message to an accepted batch or a rejection with its reason (batches,
              high-water marks and point catalogues opened by `edge_agent.seal`'s own codecs),
              or a batch to park until its catalogue comes
- `signed`    the consumer acknowledgement, signed with `edge_agent.seal.ack`
- `write`     a group of decoded messages into PostgreSQL in one transaction (COPY, ledger)
- `parking`   point catalogues and the batches parked for theirs (contract §4.12) in PostgreSQL
- `worker`    the MQTT 5 loop: shared subscription, manual PUBACK after COMMIT, acknowledgements
- `report`    completeness from the database (`ingest report`)
- `cli`       the `ingest` subcommands

It needs the `cloud` extra (psycopg 3): nothing of the agent imports it, and it imports nothing
of the agent but `edge_agent.seal`, `edge_agent.reading` and `edge_agent.errors`.
"""
