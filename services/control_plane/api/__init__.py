"""The control plane's REST API: one router per resource, and what they share.

Routers: `health` (probes and metrics), `jobs`, `estimates`, `artifacts`, `event_stream` and
`audit_log`. Shared: `dependencies` (the caller and the state the app keeps on `app.state`), `errors`
(every refusal as an `ErrorBody`), `submitted_job` (a job spec read from a body and checked),
`job_ids`, `openapi` and the `answered_requests` middleware. `stillhouse.control_plane.app` assembles
them; the wire schema is `stillhouse.control_plane.api_models`.
"""
