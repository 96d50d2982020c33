# ruff: noqa: E501  (word lists, one long line each, read more easily unwrapped)
"""Writes the shipped prompt sets: artaug/presets/train_prompts.txt and eval_prompts.txt.

Each prompt joins a subject, a scene, a lighting and a style chosen with a fixed seed. The two sets
draw from disjoint subject lists, so no evaluation subject was seen in training.

    python scripts/prompt_sets.py
"""

import random
from pathlib import Path

TRAIN_SUBJECTS = """an old fisherman mending a net|a red fox curled in the snow|a vintage bicycle leaning on a wall
|a bowl of ramen with a soft egg|a lighthouse on a rocky cape|a ballet dancer mid-leap|a stack of antique books
|a hummingbird at a trumpet flower|a steam locomotive crossing a viaduct|a glass teapot with blooming tea
|a snow leopard on a ledge|a violinist in a long coat|a paper boat in a puddle|a desert cactus in bloom
|a medieval castle on a hill|a tabby cat on a windowsill|a bowl of ripe figs|a hot air balloon over fields
|a samurai in lacquered armour|an astronaut tending a garden|a koi pond with lily pads|a street food cart
|a grandmother knitting by a stove|a white horse in a meadow|a wooden sailboat at anchor|a jazz trio on a small stage
|a cup of cappuccino with latte art|a bonsai tree on a stone table|a polar bear on drifting ice|a potter at the wheel
|a neon-lit noodle bar|a giant tortoise in tall grass|a spiral staircase in a tower|a child flying a kite
|a rusty pickup truck in a barn|a peacock with open feathers|a loaf of sourdough on a board|a mountain goat on a cliff
|a blacksmith at the anvil|a basket of lemons|an owl on a mossy branch|a vintage typewriter|a cathedral rose window
|a surfer on a breaking wave|a field of sunflowers|a chess game in a park|a dragonfly on a reed|a mechanical pocket watch
|a family of ducks crossing a path|a monk sweeping a temple yard|a glass of red wine on a terrace|a tiger drinking at a river
|a canal with moored boats|a beekeeper with a honeycomb frame|a girl reading under a tree|a vinyl record player
|a waterfall in a fern forest|a flamenco dancer in a red dress|a herd of elephants at a waterhole|a clockmaker's workbench
|a wooden cabin in pine woods|a pair of worn leather boots|a market stall of spices|a scarecrow in a wheat field
|a jellyfish drifting in dark water|a chef plating a dessert|an abandoned greenhouse|a sleeping puppy on a quilt
|a windmill by a tulip field|a crow on a fence post|a bridge over a misty river|a street musician with an accordion
|a bouquet of peonies in a jar|a cyclist on a mountain pass|a lantern festival crowd|a sea turtle over a reef
|a carpenter planing a board|a porcelain vase with blue patterns|a stag in morning fog|a rooftop garden|a tram on a hill street
|a fisherman's hut on stilts|a bowl of cherries|a knight on horseback|a robot reading a newspaper|a lone tree on a hill
|a cellist in an empty hall|a parrot on a perch|a stone well in a courtyard|a train station clock|a fox cub in clover
|a woman in a yellow raincoat|a plate of dumplings|a wolf howling on a ridge|a gondola on a canal|a weaver at a loom
|an antique globe|a strawberry tart|a lion resting in savanna grass|a pier at low tide|a glassblower shaping a vase
|a snowy village street|a rabbit in a vegetable patch|a campfire under pine trees|a sculptor carving marble
|a farmhouse kitchen table|a flock of flamingos|a diver exploring a wreck|a mountain monastery|a candlelit dinner table
|a deer drinking from a stream|a busy harbour with cranes|an old man feeding pigeons|a field of lavender
|a squirrel holding an acorn|a tea ceremony|a fireworks display over a bay|a racing car in the pit lane|a bamboo forest path"""

EVAL_SUBJECTS = """a heron standing in shallow water|a baker pulling bread from an oven|a vintage convertible on a coast road
|a wind-bent cypress on a cliff|an orangutan holding a leaf|a marionette maker's shop|a rowing boat on a still lake
|a cat asleep on a piano|a courtyard fountain with pigeons|a tram depot at closing time|a pomegranate cut in half
|a pilgrim with a walking staff|a humpback whale breaching|a harpist in a garden|a snail on a wet leaf
|a shepherd with a flock on a slope|a row of colourful beach huts|a kingfisher diving|a lace maker at work
|a dusty record shop|a camel caravan on dunes|a pair of swans on a pond|a mechanic under a vintage car
|a ceramic bowl of olives|a lighthouse keeper climbing stairs|a mossy stone bridge|a firefighter resting after a fire
|a chameleon on a branch|a violin maker's bench|an ice skater on a frozen canal|a watermelon stall|a fox in a bluebell wood
|an opera singer on stage|a mountain hut under stars|a basket of wild mushrooms|a lynx in birch woods
|a calligrapher with a brush|a paper lantern shop|a goat on a farm wall|a night ferry leaving port"""

SCENES = """at the edge of a quiet village|in a sunlit studio|on a windswept coast|in a crowded city square
|deep in an autumn forest|on a rainy street|in a minimalist white room|in a snowy valley|beside a calm lake
|in a cluttered workshop|under a vast sky|in a narrow alley|on a high mountain plateau|in a botanical garden
|inside an old library|at a busy train station|in a desert canyon|in a flooded meadow|on a rooftop at night
|in a misty harbour""".replace("\n", "").split("|")

LIGHTING = """golden hour light|soft overcast light|dramatic rim lighting|warm candlelight|cool blue hour light
|harsh midday sun|moonlight|neon reflections|dappled light through leaves|backlit by a low sun|foggy diffuse light
|studio softbox lighting|light from a single window|stormy light with dark clouds|firelight""".replace(
    "\n", ""
).split("|")

STYLES = """photorealistic, 35mm film|oil painting with thick brushstrokes|watercolour illustration|cinematic still, anamorphic lens
|ink and wash drawing|hand-drawn animation film style|high detail digital art|black and white photograph, high contrast
|impressionist painting|vintage postcard|3D render, soft shadows|gouache illustration|macro photograph, shallow depth of field
|ukiyo-e woodblock print|pastel drawing|wide-angle landscape photograph|art nouveau poster|pencil sketch with light colour
|low-poly illustration|documentary photograph""".replace("\n", "").split("|")


def compose(subjects: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts: list[str] = []
    seen = set()
    while len(prompts) < count:
        subject = subjects[len(prompts) % len(subjects)]  # every subject used evenly
        prompt = f"{subject} {rng.choice(SCENES)}, {rng.choice(LIGHTING)}, {rng.choice(STYLES)}"
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def subjects(text: str) -> list[str]:
    return [s.strip() for s in text.replace("\n", "").split("|") if s.strip()]


if __name__ == "__main__":
    train, held_out = subjects(TRAIN_SUBJECTS), subjects(EVAL_SUBJECTS)
    assert not set(train) & set(held_out)
    presets = Path(__file__).resolve().parent.parent / "artaug" / "presets"
    (presets / "train_prompts.txt").write_text("\n".join(compose(train, 500, seed=1)) + "\n")
    (presets / "eval_prompts.txt").write_text("\n".join(compose(held_out, 200, seed=2)) + "\n")
