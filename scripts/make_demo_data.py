"""Write the data and tokenizer ``lema demo`` ships with (``lema/data/demo/``).

The chat data: a small help-desk assistant. Each conversation is one user message (one of
many phrasings of an intent) and the assistant's fixed answer for that intent. Two
phrasings of every intent are held out for evaluation, so the held-out loss measures
whether the adapter learned to map unseen phrasings to the right answer.

The tokenizer: a byte-level BPE (512 tokens) trained on the conversations and the shipped
corpus, with chat special tokens and a chat template whose assistant text sits inside
``{% generation %}`` marks.

Run from the repository root: ``python scripts/make_demo_data.py`` (deterministic).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "lema" / "data" / "demo"
SYSTEM = "You are the help desk of the Riverside library."
INTENTS = {
    "hours": ("We are open from nine to six, Monday to Saturday.", [
        "When are you open?", "What are your opening hours?", "What time do you open?", "When do you close today?",
        "Are you open on Saturday?", "How late are you open?", "What time does the library open?",
        "Until when can I come in today?", "Tell me your hours please.", "Is the library open in the morning?",
        "What are the library hours?", "When can I visit?"]),
    "renew": ("You can renew a book online or at the front desk, up to three times.", [
        "How do I renew a book?", "Can I renew my loan?", "I need more time with my book.",
        "Can I keep the book longer?", "How can I extend my loan?", "Is it possible to renew online?",
        "My book is due soon, can I renew it?", "How many times can I renew?", "I want to renew my books.",
        "Can you extend the due date?", "How do renewals work?", "Please renew my book."]),
    "card": ("Bring a photo ID and proof of address to the front desk for a free card.", [
        "How do I get a library card?", "Can I sign up for a card?", "I want a library card.",
        "What do I need for a card?", "How can I become a member?", "Is the library card free?",
        "I lost my card, can I get a new one?", "Where do I register?", "How do I join the library?",
        "Can my child get a card?", "What documents do I need to join?", "I would like to register."]),
    "wifi": ("The wifi network is Riverside Guest and the password is on your receipt.", [
        "Is there wifi?", "What is the wifi password?", "How do I get online?", "Can I use the internet here?",
        "Do you have free wifi?", "Which network should I join?", "The wifi is not working for me.",
        "How do I connect my laptop?", "Is the internet free?", "What is the network name?",
        "I need the wifi code.", "Can I connect my phone to the internet?"]),
    "fines": ("Late books cost ten cents a day, and you can pay at the front desk.", [
        "How much is a late fee?", "I returned a book late.", "Do you charge fines?", "What happens if I am late?",
        "How do I pay a fine?", "Is there a fee for late books?", "My book is overdue.", "What are the late fees?",
        "Can I pay my fines online?", "How much do I owe for a late book?", "I forgot to return my book.",
        "What does a late return cost?"]),
    "print": ("Printing costs ten cents a page; the printers are on the first floor.", [
        "Can I print something?", "Where is the printer?", "How much does printing cost?", "Do you have a printer?",
        "I need to print a document.", "Is printing free?", "Can I print in colour?",
        "How do I print from my laptop?", "Where can I make copies?", "Is there a copy machine?",
        "How much is a printed page?", "Can I print my ticket here?"]),
    "rooms": ("Study rooms can be booked for two hours at the front desk.", [
        "Can I book a study room?", "Do you have quiet rooms?", "I need a room for my group.",
        "How do I reserve a room?", "Is there a place to study with friends?", "Are there meeting rooms?",
        "Can we use a room for a meeting?", "How long can I keep a study room?", "I want to book a room.",
        "Where can I study quietly?", "Do rooms need a booking?", "Is a group room free now?"]),
    "thanks": ("You are welcome! Enjoy your visit.", [
        "Thank you!", "Thanks a lot.", "Thanks for your help.", "That was helpful, thank you.", "Great, thanks!",
        "Thank you very much.", "Many thanks.", "Cheers, that helps.", "I appreciate it.", "Perfect, thank you.",
        "Thanks, that is all.", "Wonderful, thanks."]),
}
TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}<|assistant|>\n"
            "{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}\n{% else %}"
            "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def conversations() -> tuple[list[dict], list[dict]]:
    rng = random.Random(17)
    train, held = [], []
    for answer, phrasings in INTENTS.values():
        order = list(phrasings)
        rng.shuffle(order)
        for k, question in enumerate(order):
            row = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                                {"role": "assistant", "content": answer}]}
            (held if k < 2 else train).append(row)
    rng.shuffle(train)
    return train, held


def main() -> None:
    import sys

    sys.path.insert(0, str(ROOT))
    from lema.data.examples import shipped_corpus
    from lema.data.tokenizer import build_byte_tokenizer

    train, held = conversations()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    texts = [m["content"] for r in train + held for m in r["messages"]] * 20
    tok = build_byte_tokenizer([shipped_corpus(), *texts], vocab_size=512,
                               extra_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])
    tok.chat_template = TEMPLATE
    tok.save_pretrained(OUT)
    print(f"wrote {len(train)} training and {len(held)} held-out conversations and the tokenizer into {OUT}")


if __name__ == "__main__":
    main()
