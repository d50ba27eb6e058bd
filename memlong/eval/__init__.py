"""Quality and speed evaluations: perplexity on long books and passkey retrieval."""
