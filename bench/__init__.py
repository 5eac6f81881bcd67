"""Benchmarks of chatstream-asgi (not part of the distribution). Run: python -m bench"""
