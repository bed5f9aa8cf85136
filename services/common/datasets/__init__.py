"""The formats of what a job stores: datasets of Parquet shards under a manifest, the teacher's sparse
logprobs inside them, the rows each stage writes (records), and artifacts (model folders and reports
uploaded with a checksummed listing)."""
