"""`omnilm chat`: an interactive terminal chat over the same backend and prompt rendering as the server.

Lines starting with "/" are commands; anything else is a message. Attached media go with the next
message. Generated images and audio are written to files whose names are printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import MediaError, OmniLMError

HELP = """commands:
  /image PATH   attach an image to the next message     /audio PATH   attach an audio clip
  /file PATH    attach a document (PDF, CSV, text, ...)  /system TEXT  set the system message
  /reset        forget the conversation                   /save FILE    write the conversation as JSON
  /help         this text                                 /quit         leave (also Ctrl-D)"""


class TerminalChat:
    def __init__(self, backend, cfg, out=None, media_dir="."):
        self.backend, self.cfg = backend, cfg
        self.out = out or sys.stdout
        self.media_dir = Path(media_dir)
        self.system: str | None = None
        self.history: list[dict] = []
        self.attached: list[dict] = []
        self.written = 0

    def say(self, text="", end="\n"):
        self.out.write(text + end)
        self.out.flush()

    def handle(self, line: str) -> bool:
        """One input line; False when the user leaves."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            return self._command(line)
        try:
            self._ask(line)
        except OmniLMError as e:
            self.say("error: " + " ".join(str(e).split()))
        return True

    def _command(self, line: str) -> bool:
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd in ("/image", "/audio", "/file"):
            kind = cmd[1:]
            if not arg or not Path(arg).is_file():
                self.say(f"error: {cmd}: no such file: {arg or '(none given)'}")
            else:
                self.attached.append({"type": kind, kind: arg})
                self.say(f"attached {kind} {arg}")
        elif cmd == "/system":
            self.system = arg or None
            self.say("system message " + ("set" if arg else "cleared"))
        elif cmd == "/reset":
            self.history, self.attached = [], []
            self.say("conversation reset")
        elif cmd == "/save":
            if not arg:
                self.say("error: /save needs a file name")
            else:
                Path(arg).write_text(json.dumps(self._messages(), indent=2, ensure_ascii=False) + "\n")
                self.say(f"wrote {arg}")
        elif cmd == "/help":
            self.say(HELP)
        else:
            self.say(f"error: unknown command {cmd} (try /help)")
        return True

    def _messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def _ask(self, text: str):
        from ..generation.text import TextStream
        from ..pipeline import prompt_of, render_messages

        content = [*self.attached, {"type": "text", "text": text}] if self.attached else text
        self.history.append({"role": "user", "content": content})
        self.attached = []
        try:
            encoded = prompt_of(render_messages(self.backend.processor, self._messages()))
        except (OmniLMError, OSError):
            self.history.pop()
            raise
        prompt, media = encoded.ids, encoded.media
        room = self.backend.context - len(prompt)
        if room < 1:
            self.history.pop()
            raise MediaError(f"the conversation ({len(prompt)} tokens) fills the context; try /reset")
        cfg = self.cfg.updated(max_new_tokens=min(self.cfg.max_new_tokens, room))
        stream = TextStream(self.backend.processor.tokenizer, cfg.stop_strings)
        ids = []
        req = self.backend.submit(prompt, cfg, media)
        try:
            for ev in req.events():
                if ev.finish_reason == "error":
                    raise (
                        ev.error
                        if isinstance(ev.error, OmniLMError)
                        else OmniLMError(f"generation failed: {ev.error}")
                    )
                if ev.token is not None and ev.token not in self.backend.eos_ids:
                    ids.append(ev.token)
                    self.say(stream.push(ev.token), end="")
                    if stream.stopped:
                        break
        finally:
            req.cancel()
        self.say(stream.finish())
        self.history.append({"role": "assistant", "content": stream.text})
        self._write_media(prompt + ids)

    def _write_media(self, ids):
        if getattr(self.backend.model.config, "discrete", None) is None:
            return
        import soundfile

        images, waves = self.backend.decode_media(ids)
        for im in images:
            self.written += 1
            path = self.media_dir / f"chat-{self.written}.png"
            im.save(path)
            self.say(f"[image written to {path}]")
        for wave, rate in waves:
            self.written += 1
            path = self.media_dir / f"chat-{self.written}.wav"
            soundfile.write(path, wave, rate)
            self.say(f"[audio written to {path}]")


def run(backend, cfg, stdin=None, out=None, media_dir="."):
    """The read-answer loop until /quit or end of input."""
    stdin = stdin or sys.stdin
    chat = TerminalChat(backend, cfg, out=out, media_dir=media_dir)
    interactive = stdin.isatty()
    if interactive:
        chat.say("OmniLM chat; /help lists the commands, /quit leaves.")
    while True:
        if interactive:
            chat.say("> ", end="")
        line = stdin.readline()
        if not line or not chat.handle(line):
            break
    backend.stop()
