"""The ways a person starts the package without writing code: `chatstream-asgi serve` and
`chat`, the console conversation, the offline demo model."""
