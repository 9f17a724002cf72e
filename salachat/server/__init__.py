"""`salachat serve`: an OpenAI-compatible server over the product library, that never reads a document twice.

- protocol.py: requests in (messages → system prompt, documents, exchanges, question), responses, chunks
  and errors out, in OpenAI's shapes.
- states.py: the engine states kept between requests (ChatSession forks at message boundaries, and saved
  sessions), so a follow-up continues instead of reading again.
- runner.py: the one model thread, its bounded queue, cancellation between tokens.
- app.py: the Starlette routes and the API key.
- command.py: what the `serve` command (salachat/cli/serve.py) calls: the listening socket, uvicorn and a
  clean stop.
"""
