"""A deterministic corpus of varied strings for tokenizer parity tests (no files, no network).

Multilingual prose, CJK, emoji (ZWJ sequences, flags, skin tones), code, long whitespace runs, digits,
contractions in any case, special-token-looking text, random code points from many Unicode blocks, and
random mixtures of all of those.
"""

from __future__ import annotations

import random

PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "This is a test sentence.",
    "Hello, world!",
    "Le cœur a ses raisons que la raison ne connaît point.",
    "Über allen Gipfeln ist Ruh', in allen Wipfeln spürest du kaum einen Hauch.",
    "¿Dónde está la biblioteca? ¡Allí!",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "صِف خَلقَ خَودِ كَمِثلِ الشَمسِ إِذ بَزَغَت",
    "דג סקרן שט בים מאוכזב ולפתע מצא חברה",
    "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले",
    "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ",
    "我能吞下玻璃而不伤身体。",
    "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。",
    "다람쥐 헌 쳇바퀴에 타고파",
    "Tiếng Việt có dấu: Những con chó đang chạy.",
    "Pchnąć w tę łódź jeża lub ośm skrzyń fig.",
    "Árvíztűrő tükörfúrógép",
    "Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "Ça va? Oui, très bien — merci! «Guillemets» et “quotes” ‘single’",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "Բարեւ աշխարհ", "გამარჯობა მსოფლიო", "ሰላም ልዑል", "Γειά σου Κόσμε", "Привет, мир",
]
EMOJI = [
    "🙂", "😂🤣", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸🇯🇵🇫🇷", "❤️", "🧑🏿‍💻", "🐍 Python", "🦙 Llama 3.2!",
    "I ❤️ NY", "☕️ and 🍰", "✅ done ❌ failed ⚠️ warning", "🤖🤖🤖", "👩‍🔬 science",
]
CODE = [
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"name": "get_weather", "parameters": {"city": "San Francisco", "metric": "celsius"}}',
    "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
    "import numpy as np\nx = np.arange(10).reshape(2, 5)  # shape (2, 5)\n",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "$ ls -la | grep '^d' > out.txt 2>&1",
    "[get_weather(city=\"San Francisco\", metric=\"celsius\"), get_time(tz='PST')]",
    "<|python_tag|>brave_search.call(query=\"latest price of 1oz gold\")<|eom_id|>",
    "<function=trending_songs>{\"n\": 10}</function>",
    "x = {'a': [1, 2, {'b': None}], \"c\": True}",
    "    \t\n\r\n  indented\n\n\n",
    "a\r\nb\rc\nd", "\\n is not a newline", "C:\\Users\\name\\file.txt",
]
SPECIAL_LOOKING = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|start_header_id|>user<|end_header_id|>",
    "<|python_tag|>", "<|image|>", "<|reserved_special_token_5|>", "<|reserved_special_token_245|>",
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "<|eot", "eot_id|>", "< |eot_id| >", "<<|eot_id|>>",
    "<repo_name>", "<filename>x.py", "</s>", "<s>", "[INST]", "<tool_call>", "<|fim_prefix|>",
]
CONTRACTIONS = ["it's", "IT'S", "don't", "DON'T", "we're", "WE'RE", "I've", "I'M", "you'll", "YOU'LL", "he'd",
                "HE'D", "'s", "''s'", "rock'n'roll"]
DIGITS = ["0", "7", "42", "123", "1234", "12345", "1234567890", "3.14159", "1,000,000", "2024-07-26", "+1 (555) 010-9999",
          "0x1F600", "1e-10", "٣٤٥", "१२३४", "Ⅻ", "½", "²³", "10000000000000000000000"]
WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2009", "\t\t\t",
              " " * 17, "\n" * 9, " \t \n\r ", "\u200b", "\ufeff"]

# Unicode blocks to draw random code points from (surrogates excluded).
BLOCKS = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
          (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F), (0x2190, 0x23FF), (0x2500, 0x27BF),
          (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xE0FF), (0xFF00, 0xFFEF),
          (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF), (0x0, 0x1F), (0x10000, 0x1007F), (0xE0000, 0xE007F)]


def random_unicode(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        lo, hi = rng.choice(BLOCKS)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def corpus(n: int = 1200, seed: int = 0) -> list[str]:
    """At least `n` strings: every fixed sample, then random single-kind and mixed strings."""
    rng = random.Random(seed)
    fixed = PROSE + EMOJI + CODE + SPECIAL_LOOKING + CONTRACTIONS + DIGITS + WHITESPACE + [""]
    pools = [PROSE, EMOJI, CODE, SPECIAL_LOOKING, CONTRACTIONS, DIGITS, WHITESPACE]
    out = list(fixed)
    while len(out) < n:
        kind = rng.randrange(6)
        if kind == 0:  # random unicode
            out.append(random_unicode(rng, rng.randint(1, 40)))
        elif kind == 1:  # a mixture of pieces
            out.append("".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(2, 8))))
        elif kind == 2:  # mixture joined by random whitespace
            out.append(rng.choice(WHITESPACE).join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(2, 6))))
        elif kind == 3:  # long whitespace / digit / repeated runs
            piece = rng.choice([" ", "\n", "\t", "0", "9", "a", "ab", "🙂", "中", "\r\n", "-", "=", "."])
            out.append(rng.choice(PROSE) + piece * rng.randint(2, 300) + rng.choice(PROSE))
        elif kind == 4:  # random ASCII with punctuation
            alphabet = "abcXYZ019 \n\t'\"<>|_-.,;:!?()[]{}#@$%^&*/\\"
            out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))))
        else:  # prose with random unicode spliced in
            s = rng.choice(PROSE)
            i = rng.randint(0, len(s))
            out.append(s[:i] + random_unicode(rng, rng.randint(1, 5)) + s[i:])
    return out
