import asyncio


async def test_runs_on_each_loop(request) -> None:
    loop = asyncio.get_running_loop()
    name = type(loop).__module__.split(".")[0]
    assert name in request.node.name
