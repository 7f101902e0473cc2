"""`m3ae serve`: image, text and joint embeddings over HTTP, on Ray Serve.

- `inputs`: what a request may hold, and its limits (no model, no Ray);
- `engine`: one replica's model: decoding, batches through the shared encode path;
- `app`: the Ray Serve deployment: routes, auth, dynamic batching;
- `server`: the command and the `serve()` / `shutdown()` library calls.
"""
