"""A DeploymentHandle's surface over an object in this process, for the HTTP app's tests without Ray:
`handle.method.remote(*args)` (awaitable, or async-iterable for a stream) and `.options(...)`."""

from __future__ import annotations


class Call:
    """What `handle.method.remote(...)` returns: awaitable, or iterable for a stream."""

    def __init__(self, result):
        self.result = result

    def __await__(self):
        return self.result.__await__()

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.result.__anext__()

    def cancel(self):
        pass


class LocalHandle:
    """`handle.method.remote(*args)` calls `target.method(*args)`; `.options(stream=True)` and the like change nothing."""

    def __init__(self, target):
        self.target = target

    def options(self, **_):
        return self

    def __getattr__(self, method):
        function = getattr(self.target, method)
        return type("Method", (), {"remote": staticmethod(lambda *args: Call(function(*args)))})
