from mtpd.data import train_tokenizer
from mtpd.decode.stream import TextStream


def test_streamed_pieces_join_to_the_decoded_text_without_broken_characters():
    text = "naïve café — ✓ done; 日本語のテキスト 🙂\n" * 3
    tokenizer = train_tokenizer(["plain ascii words only " * 50], 300)  # non-ASCII characters split into bytes
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text)  # several tokens per character somewhere
    stream = TextStream(tokenizer)
    pieces = [stream.push([token]) for token in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.flush() == text
