"""Model sources: a GGUF file or a Hugging Face directory, read tensor by tensor, and the identity
(model id and weight fingerprint) that client and server must agree on."""
