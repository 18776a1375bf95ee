"""OpenAI's Agents SDK (`openai-agents`), the client voice agents are written with, against the Realtime route
of the demo, with the SDK's own defaults: `semantic_vad` turn detection, `gpt-4o-mini-transcribe` for the
user's words (an alias of the demo's STT model), pcm16 both ways. The SDK validates every server event
against the openai package's GA types, and turns what fails into an exception event: none may come."""

from __future__ import annotations

import asyncio

from test_realtime import DEFAULT_LLM, silence_pcm24, speech_pcm24


def _kind(event) -> str:
    """The session event's type; for a raw model event, the model event's (or the server event's) type."""
    if event.type != "raw_model_event":
        return event.type
    if event.data.type == "raw_server_event":
        return f"server:{event.data.data.get('type')}"
    return f"model:{event.data.type}"


async def _until(session, kind: str, seen: list, timeout: float = 90.0) -> None:
    async def collect():
        async for event in session:
            seen.append(event)
            if _kind(event) in (kind, "error", "model:exception", "model:error"):
                return

    await asyncio.wait_for(collect(), timeout)


def test_a_voice_agent_of_the_agents_sdk_hears_answers_and_takes_a_typed_turn(demo_app):
    from agents.realtime import RealtimeAgent, RealtimeRunner

    runner = RealtimeRunner(starting_agent=RealtimeAgent(name="Assistant", instructions="Be brief."),
                            config={"model_settings": {"max_output_tokens": 24}})
    url = demo_app.url.replace("http://", "ws://") + f"/v1/realtime?model={DEFAULT_LLM}"

    async def scenario():
        spoken, typed = [], []
        async with await runner.run(model_config={"url": url, "api_key": "unused"}) as session:
            # "Hello there.", then the silence a microphone keeps sending: semantic_vad (eagerness auto) waits
            # up to 4 s after words it cannot tell are finished (the tiny Whisper's words are noise)
            await session.send_audio(speech_pcm24((0.0, 1.4)) + silence_pcm24(5.0))
            await _until(session, "agent_end", spoken)
            await session.send_message("Say hello.")
            await _until(session, "agent_end", typed)
        return spoken, typed

    spoken, typed = asyncio.run(scenario())
    kinds = [_kind(event) for event in spoken + typed]
    assert not {"error", "model:exception", "model:error"} & set(kinds), [
        e for e in spoken + typed if _kind(e) in ("error", "model:exception", "model:error")]
    detection = next(e.data.data["session"]["audio"]["input"]["turn_detection"] for e in spoken
                     if _kind(e) == "server:session.updated")
    assert detection["type"] == "semantic_vad"  # the SDK's default, taken (it was an error event)
    spoken_kinds = [_kind(event) for event in spoken]
    order = ["server:input_audio_buffer.speech_started", "server:input_audio_buffer.speech_stopped",
             "model:input_audio_transcription_completed", "agent_start", "agent_end"]
    positions = [spoken_kinds.index(kind) for kind in order]
    assert positions == sorted(positions), spoken_kinds
    assert spoken_kinds.count("server:input_audio_buffer.speech_started") == 1
    assert "server:response.done" in spoken_kinds and "server:response.done" in [_kind(e) for e in typed]
    # the SDK's own record of the conversation: the spoken turn with its transcript, the typed one, two replies
    history = [event for event in spoken + typed if event.type == "history_updated"][-1].history
    roles = [(item.role, item.content[0].type) for item in history if item.type == "message"]
    assert roles == [("user", "input_audio"), ("assistant", "audio"), ("user", "input_text"), ("assistant", "audio")]
    assert isinstance(history[0].content[0].transcript, str)
    statuses = [item.status for item in history if item.type == "message" and item.role == "assistant"]
    assert set(statuses) <= {"completed", "incomplete"}, statuses  # the SDK saw each reply end (24 tokens may cut it)


def test_a_barge_in_interrupts_the_agent_and_the_sdk_truncates_what_was_heard(demo_app):
    """The user speaks while the agent's answer plays: the server cancels the response, the SDK reports the
    interruption and truncates the assistant's item to the audio it had played, which the server takes."""
    from agents.realtime import RealtimeAgent, RealtimeRunner

    runner = RealtimeRunner(starting_agent=RealtimeAgent(name="Assistant", instructions="Answer at length."),
                            config={"model_settings": {"max_output_tokens": 200}})
    url = demo_app.url.replace("http://", "ws://") + f"/v1/realtime?model={DEFAULT_LLM}"

    async def scenario():
        seen: list = []
        async with await runner.run(model_config={"url": url, "api_key": "unused"}) as session:
            await session.send_message("Tell me about the history of Rome.")
            # the first audio is the reply's first sentence (80 characters at most); SmolLM2 at the session's 0.8
            # ran past 40 tokens (146+ characters) in 320 of 320 draws of this prompt: there is more to cut
            await _until(session, "audio", seen)
            await session.send_audio(speech_pcm24((0.0, 1.4)))  # the user cuts in
            await _until(session, "audio_interrupted", seen)
            await session.send_audio(silence_pcm24(5.0))
            await _until(session, "server:conversation.item.truncated", seen)  # the SDK's truncate, taken
        return seen

    seen = asyncio.run(scenario())
    kinds = [_kind(event) for event in seen]
    assert not {"error", "model:exception", "model:error"} & set(kinds), [
        e for e in seen if _kind(e) in ("error", "model:exception", "model:error")]
    assert kinds.index("audio_interrupted") < kinds.index("server:response.done")
    [done] = [e.data.data["response"] for e in seen if _kind(e) == "server:response.done"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "turn_detected"
    truncated = next(e.data.data for e in seen if _kind(e) == "server:conversation.item.truncated")
    assert truncated["item_id"] == done["output"][0]["id"]  # the answer, cut where its playback was
