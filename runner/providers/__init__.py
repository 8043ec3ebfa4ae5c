"""Card-platform adapters behind one protocol; nothing outside this package imports aiohttp."""
