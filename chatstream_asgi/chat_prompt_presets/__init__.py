"""ChatStream's bundled prompt classes, one module each under ChatStream's module names.

Written from each model's documented prompt format and ChatStream 0.3.0's rendering of it, so a
session renders the same prompt it did under ChatStream. Import them from `chatstream_asgi`
(`from chatstream_asgi import ChatPromptTogetherRedPajamaINCITEChat`) or from their module here.
"""
