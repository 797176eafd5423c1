"""The HTTP routers: thin, each route calls one service method."""
