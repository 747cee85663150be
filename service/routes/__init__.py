"""The HTTP routes, one module per area: `tokens` (encode, decode, preview), `jobs` (generation
jobs), `system` (health, readiness, metrics, models, the playground). A route parses and validates
its request, hands the work to the runtime's engine or job store (received through `Depends`,
`deps.py`) and answers; `spec.py` holds what the OpenAPI spec says of their bodies and refusals."""
