"""Generate the built-in task: routing help-desk tickets of a fictional phone company to teams.

Why this task: it needs no downloaded text (the demo runs offline), its labels are team colours
whose mapping to ticket topics is the company's own convention, so a model cannot know it
zero-shot (accuracy near chance, 25%), yet it is learnable from a few hundred examples because
the topics are semantically distinct. Tickets are composed from many independent parts
(opening, intent sentence with slot values, optional context, optional cross-topic mention,
closing), so there are millions of distinct tickets and memorising templates is not enough.
"""

from __future__ import annotations

import random

INSTRUCTION = (
    "Route this support ticket to the team that handles it. "
    "Answer with one word: red, blue, green or amber."
)

# topic -> team colour: the arbitrary in-house convention the model must learn.
TEAMS = {"billing": "green", "delivery": "amber", "technical": "red", "account": "blue"}

_PRODUCTS = [
    "Nova 12 phone", "Nova 12 Pro", "Pixelite tablet", "Aero earbuds", "Volt charger",
    "Zen smartwatch", "Orbit router", "Lumen 5G hotspot", "Atlas phone case", "Echo speaker",
    "Drift SIM card", "Comet fitness band", "Pulse power bank", "Halo screen protector",
]
_AMOUNTS = ["$12.99", "$45", "$89.50", "$120", "$7.20", "$230", "$19.99", "$64", "$310", "$3.50"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]
_CITIES = ["Leeds", "Porto", "Austin", "Lyon", "Osaka", "Denver", "Gdansk", "Perth", "Quito"]
_FEATURES = ["Wi-Fi calling", "Bluetooth", "the camera app", "voicemail", "mobile data",
             "the fingerprint reader", "screen mirroring", "hotspot sharing", "GPS"]

_INTENTS = {
    "billing": [
        "I was charged {amount} twice on my {month} bill.",
        "My invoice shows a fee of {amount} that I never agreed to.",
        "Can you explain why my monthly plan went up by {amount}?",
        "I'd like a refund of {amount} for the {product} I returned.",
        "The autopay took {amount} from my card even though I paid by transfer.",
        "Please send me a corrected invoice for {month}; the total is wrong.",
        "There is an international roaming charge of {amount} but I never left {city}.",
        "I want to change my payment card before the {month} billing date.",
    ],
    "delivery": [
        "My {product} order still hasn't arrived after two weeks.",
        "The courier left my parcel at the wrong address in {city}.",
        "Tracking for order #{order} has said 'in transit' since {month}.",
        "The box with my {product} arrived crushed and the item is missing.",
        "Can I change the delivery address for order #{order} to {city}?",
        "I received someone else's package instead of my {product}.",
        "The delivery was scheduled for Monday but nobody came to {city}.",
        "Please reschedule the shipment of my {product}; I'm away until {month}.",
    ],
    "technical": [
        "My {product} keeps restarting whenever I open {feature}.",
        "Since the last update, {feature} stopped working on my {product}.",
        "The {product} won't charge past 40% anymore.",
        "I get an error code {order} when I try to turn on {feature}.",
        "The screen on my {product} flickers and then goes black.",
        "{feature} drops every few minutes even with full signal in {city}.",
        "My {product} overheats and shuts down while using {feature}.",
        "After a factory reset the {product} is stuck on the logo screen.",
    ],
    "account": [
        "I forgot my password and the reset email never comes.",
        "Someone logged into my account from {city} and it wasn't me.",
        "Please update the email address on my profile.",
        "I want to close my account at the end of {month}.",
        "How do I add my partner as a second user on my account?",
        "My account got locked after too many login attempts.",
        "I need to change the name on my account after getting married.",
        "The two-factor code goes to my old number; please update it.",
    ],
}
# A mention of another topic that is context, not the request (makes keywords unreliable).
_ASIDES = {
    "billing": "My bill was fine last month, by the way.",
    "delivery": "The {product} itself arrived on time, so that's not the issue.",
    "technical": "The {product} works perfectly otherwise.",
    "account": "I can log into my account without problems.",
}
_OPENINGS = ["Hi,", "Hello team,", "Good morning.", "Hey there,", "Dear support,", "", "Hi again,",
             "To whom it may concern,", "Quick question.", "Urgent:"]
_CONTEXT = ["I've been a customer since {year}.", "I live in {city}.", "This is my second message.",
            "I'm writing from my work email.", "", "", "I called yesterday but got no answer."]
_CLOSINGS = ["Thanks.", "Thank you!", "Please help.", "Regards, {name}", "Cheers, {name}",
             "Looking forward to your reply.", "", "Best, {name}", "Thanks in advance."]
_NAMES = ["Ana", "Tom", "Priya", "Jonas", "Mei", "Carlos", "Fatima", "Lars", "Zoe", "Kwame"]


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        amount=rng.choice(_AMOUNTS), month=rng.choice(_MONTHS), city=rng.choice(_CITIES),
        product=rng.choice(_PRODUCTS), feature=rng.choice(_FEATURES), name=rng.choice(_NAMES),
        order=rng.randint(10000, 99999), year=rng.randint(2008, 2024),
    )


def ticket(topic: str, rng: random.Random) -> str:
    """Compose one ticket about ``topic`` from independently drawn parts."""
    parts = [rng.choice(_OPENINGS), _fill(rng.choice(_CONTEXT), rng)]
    parts.append(_fill(rng.choice(_INTENTS[topic]), rng))
    if rng.random() < 0.3:
        other = rng.choice([t for t in TEAMS if t != topic])
        parts.append(_fill(_ASIDES[other], rng))
    parts.append(_fill(rng.choice(_CLOSINGS), rng))
    return " ".join(p for p in parts if p)


def generate(n: int, seed: int) -> list[dict[str, str]]:
    """Return ``n`` distinct labelled tickets ``{"text", "label"}``, balanced over the 4 teams."""
    rng = random.Random(seed)
    topics = list(TEAMS)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        topic = topics[len(rows) % len(topics)]
        text = ticket(topic, rng)
        if text not in seen:  # distinct texts, so eval never repeats a training ticket verbatim
            seen.add(text)
            rows.append({"text": text, "label": TEAMS[topic]})
    rng.shuffle(rows)
    return rows
