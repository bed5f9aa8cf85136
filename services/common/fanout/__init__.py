"""Fan-out of a stage over shards: the same per-shard code runs in this process or as Ray tasks.

A stage splits its input into shards (`FanoutPlan`), each a JSON payload that names its slice of the input
and where its output goes. A shard function answers one payload: it commits its own output atomically (so a
shard that already committed is skipped on a re-run) and returns a small JSON result. `fanout_for` is the one
switch between the two ways of running the shards: `InProcessFanout` for small jobs and embedded mode, and
`RayFanout` (a Ray job whose driver runs every shard as a Ray task on the cluster's CPU workers) when the
service has a Ray cluster and the input is large enough to be worth it.
"""
