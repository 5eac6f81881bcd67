"""ChatStream's surface over the package's own parts: the `ChatStream` facade, its defaults,
`client_roles`, `append_apis`/`append_middlewares` and mock modes. Only the public paths above it import it."""
