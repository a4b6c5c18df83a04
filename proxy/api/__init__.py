"""The HTTP API: routes, handlers, middleware. The only layer that knows aiohttp.web."""
