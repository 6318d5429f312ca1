"""`omnilm chat`: the terminal chat over the demo, commands and all."""

import io
import json

from omnilm.cli import main


def test_terminal_chat_commands_and_answers(tmp_path, monkeypatch, capsys):
    from omnilm.demo.data import load_digits, render_digit

    _, _, test_x, test_y = load_digits(seed=0)
    render_digit(test_x[3], 16).save(tmp_path / "digit.png")
    lines = [
        "/help",
        f"/image {tmp_path / 'digit.png'}",
        "which digit is this?",
        "/audio /no/such.wav",
        "/system you read digits",
        f"/save {tmp_path / 'chat.json'}",
        "/reset",
        "draw a 7",
        "/bogus",
        "/quit",
        "never read",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", "demo", "--media-dir", str(tmp_path), "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out

    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                "demo",
                "--image",
                str(tmp_path / "digit.png"),
                "--prompt",
                "which digit is this?",
            ]
        )
        == 0
    )
    cli_answer = capsys.readouterr().out.strip()
    assert f"\n{cli_answer}\n" in out  # the same answer as omnilm generate
    assert "/image PATH" in out and "error: /audio: no such file" in out and "unknown command /bogus" in out
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    assert saved[1]["content"][0] == {"type": "image", "image": str(tmp_path / "digit.png")}
    assert saved[2]["content"] == cli_answer
    assert f"[image written to {tmp_path / 'chat-1.png'}]" in out and (tmp_path / "chat-1.png").is_file()
