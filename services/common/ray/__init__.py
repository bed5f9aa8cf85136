"""Ray for every service: a local head for embedded mode, and the job API of a Ray cluster."""
