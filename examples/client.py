"""Talk to a running Tether agent with the official A2A client (a2a-sdk).

    pip install "a2a-sdk[http-server]"
    python examples/client.py "hi there"
"""

import asyncio
import sys
import uuid

from a2a.client import ClientConfig, ClientFactory
from a2a.types.a2a_pb2 import Message, Part, Role, SendMessageRequest, TaskState


async def main(text: str, url: str = "http://127.0.0.1:8000") -> None:
    client = await ClientFactory(ClientConfig(streaming=False)).create_from_url(url)
    request = SendMessageRequest(
        message=Message(role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[Part(text=text)])
    )
    try:
        async for response in client.send_message(request):
            task = response.task
            state = TaskState.Name(task.status.state)
            print(task.id, state, task.status.message.parts[0].text)
    finally:
        await client.close()


if __name__ == "__main__":
    asyncio.run(main(" ".join(sys.argv[1:]) or "hello from a2a-sdk"))
