"""The pass viewer: the HTML document of a compilation and its local server."""
