"""Everything HTTP: the middleware and its routes, body reading, the disconnect watch, errors as
responses, wire formats, the streamed responses, the chat endpoint, the APIs, `/v1`, the page."""
