"""Server-side sessions: the store protocol, signed cookies, the memory and Redis stores, and the
sessions an app's route or another middleware holds. Nothing here speaks HTTP responses."""
