"""What runs a turn whatever speaks to the client: admission (slots and the wait queue), model
replicas, and `ChatService`. Knows engines and core, not HTTP, sessions or ChatStream."""
