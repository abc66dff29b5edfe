"""An offline product catalog and shopping instructions, deterministic from a seed.

Five categories (beauty, electronics, fashion, food, furniture), twelve product types each. A product has a
brand, a title, 3-5 attributes (two of its type's, the rest of its category's), 0-2 option lists
(size/color/scent/flavor/style), a price or price range, a description, features, a rating and a few reviews,
in the same dict layout as WebShop's loaded products. Each product gets one goal, written like WebShop's
instructions: "i need a paraben free, cruelty free shampoo in lavender scent and size 3.4 fl oz (pack of 1),
and price lower than 30.00 dollars", with the goal attributes, the options and the price bound WebShop draws.
Several products of a type share attributes, so search results hold near misses.
"""
from __future__ import annotations

import random
import string

from .goal import price_bound

# Option values are picked so that WebShop master's reward credits a value chosen exactly: master scores a goal's
# options as (name, value) pairs against the chosen values after colour normalisation (goal.py), so a value whose
# normalised colour is not one of its own words never meets its pair ('sandalwood' -> 'sand', 'grey wash' ->
# 'ash', 'blueberry' -> 'blue', 'peppered' -> 'red'); tests/test_env_webshop.py checks every value.
COLORS = ["black", "white", "navy blue", "heather grey", "red", "pink", "olive green", "light blue", "burgundy",
          "beige", "purple", "charcoal", "yellow", "teal", "brown"]
CLOTHING_SIZES = ["x-small", "small", "medium", "large", "x-large", "xx-large", "3x-large"]
SHOE_SIZES = ["6", "6.5", "7", "7.5", "8", "8.5", "9", "9.5", "10", "10.5", "11", "12"]
BEAUTY_SIZES = ["1 fl oz (pack of 1)", "1.7 fl oz (pack of 1)", "3.4 fl oz (pack of 1)", "8 fl oz (pack of 2)",
                "16.9 fl oz (pack of 1)", "2 count", "3 count"]
SCENTS = ["lavender", "unscented", "bright citrus", "coconut", "eucalyptus mint", "rose", "vanilla", "tea tree",
          "fresh linen", "cedarwood"]
SHADES = ["porcelain", "ivory", "natural beige", "warm honey", "tan", "deep", "medium", "light"]
NAIL_COLORS = ["cherry red", "nude pink", "classic black", "coral", "lilac", "mint", "gold glitter", "burgundy"]
FLAVORS = ["chocolate", "vanilla", "peanut butter", "strawberry", "sea salt", "original", "honey", "mango",
           "cinnamon", "mint", "salted caramel", "raspberry"]
DEVICE_COLORS = ["black", "white", "silver", "space gray", "blue", "rose gold", "green", "red"]
CABLE_LENGTHS = ["3 ft", "6 ft", "10 ft", "1 ft (2-pack)", "6 ft (3-pack)"]
PHONE_MODELS = ["iphone 13", "iphone 14 pro", "iphone 15", "galaxy s23", "galaxy s22 ultra", "pixel 7", "pixel 8 pro"]
WOOD_COLORS = ["walnut", "espresso", "natural oak", "white", "black", "rustic brown", "driftwood grey", "cherry"]
FABRIC_COLORS = ["grey", "beige", "navy blue", "dark green", "cream", "black", "light grey", "rust orange"]
TIERS = ["2-tier", "3-tier", "4-tier", "5-tier"]

# category -> (breadcrumb root, category attributes, [(type, breadcrumb tail, {option: values}, (lo, hi), type attributes)])
CATALOG = {
    "beauty": ("Beauty & Personal Care", [
        "paraben free", "cruelty free", "natural ingredients", "travel size", "dermatologist tested",
        "fragrance free", "vegan formula", "easy to use", "high quality", "long lasting"], [
        ("shampoo", "Hair Care › Shampoo & Conditioner › Shampoos", {"size": BEAUTY_SIZES, "scent": SCENTS}, (6, 35),
         ["sulfate free", "hair growth", "dry hair", "color treated hair"]),
        ("conditioner", "Hair Care › Shampoo & Conditioner › Conditioners", {"size": BEAUTY_SIZES, "scent": SCENTS},
         (6, 35), ["sulfate free", "frizz control", "damaged hair", "argan oil"]),
        ("face moisturizer", "Skin Care › Face › Creams & Moisturizers", {"size": BEAUTY_SIZES}, (9, 60),
         ["dry skin", "hyaluronic acid", "anti aging", "oil free"]),
        ("lip balm", "Skin Care › Lip Care › Balms & Moisturizers", {"scent": SCENTS}, (3, 15),
         ["spf protection", "shea butter", "dry lips"]),
        ("deodorant", "Personal Care › Deodorants & Antiperspirants", {"scent": SCENTS, "size": BEAUTY_SIZES}, (5, 20),
         ["aluminum free", "sensitive skin", "baking soda free"]),
        ("nail polish", "Foot, Hand & Nail Care › Nail Art & Polish › Nail Polish", {"color": NAIL_COLORS}, (4, 18),
         ["quick dry", "non toxic", "chip resistant"]),
        ("eye cream", "Skin Care › Eyes › Creams", {}, (10, 55), ["dark circles", "puffy eyes", "fine lines"]),
        ("body wash", "Personal Care › Bath & Bathing Accessories › Body Washes", {"scent": SCENTS, "size": BEAUTY_SIZES},
         (5, 25), ["moisturizing", "sensitive skin", "shea butter"]),
        ("hair mask", "Hair Care › Hair Masks", {"size": BEAUTY_SIZES}, (8, 40), ["damaged hair", "argan oil", "deep conditioning"]),
        ("makeup brush set", "Tools & Accessories › Makeup Brushes & Tools › Brush Sets", {"color": COLORS}, (8, 40),
         ["synthetic hair", "travel case", "soft bristles"]),
        ("foundation", "Makeup › Face › Foundation", {"color": SHADES}, (7, 45), ["full coverage", "matte finish", "oily skin"]),
        ("sunscreen", "Skin Care › Sun › Sunscreens", {"size": BEAUTY_SIZES}, (6, 30), ["spf 50", "water resistant", "reef safe"]),
    ]),
    "electronics": ("Electronics", [
        "easy install", "high definition", "usb c", "plug and play", "high speed", "wireless bluetooth",
        "lightweight design", "compact size", "power delivery", "water resistant"], [
        ("wireless earbuds", "Headphones, Earbuds & Accessories › Earbuds", {"color": DEVICE_COLORS}, (15, 150),
         ["noise cancelling", "charging case", "stereo sound", "hands free"]),
        ("bluetooth speaker", "Portable Audio & Video › Portable Speakers", {"color": DEVICE_COLORS}, (20, 180),
         ["stereo sound", "waterproof", "long battery life"]),
        ("usb c cable", "Computers & Accessories › Cables › USB Cables", {"size": CABLE_LENGTHS, "color": DEVICE_COLORS},
         (6, 25), ["fast charging", "braided nylon", "data transfer"]),
        ("phone case", "Cell Phone Accessories › Cases & Covers", {"style": PHONE_MODELS, "color": DEVICE_COLORS}, (8, 30),
         ["shockproof", "wireless charging", "slim fit"]),
        ("hdmi cable", "Accessories & Supplies › Audio & Video Accessories › HDMI Cables", {"size": CABLE_LENGTHS}, (7, 30),
         ["4k ultra hd", "gold plated", "high speed"]),
        ("laptop stand", "Computers & Accessories › Laptop Accessories › Stands", {"color": DEVICE_COLORS}, (15, 60),
         ["height adjustable", "aluminum alloy", "heat dissipation"]),
        ("wireless mouse", "Computers & Accessories › Keyboards, Mice & Accessories › Mice", {"color": DEVICE_COLORS},
         (10, 50), ["ergonomic design", "silent click", "usb receiver"]),
        ("power bank", "Cell Phone Accessories › Chargers › Portable Power Banks",
         {"size": ["5000mah", "10000mah", "20000mah", "26800mah"]}, (15, 70), ["fast charging", "dual usb", "led display"]),
        ("smart watch band", "Wearable Technology › Accessories › Bands",
         {"size": ["38mm", "40mm", "41mm", "42mm", "44mm", "45mm"], "color": COLORS}, (6, 25),
         ["stainless steel", "quick release", "sweat proof"]),
        ("webcam", "Computers & Accessories › Computer Accessories & Peripherals › Webcams", {}, (25, 120),
         ["1080p hd", "built in microphone", "auto focus"]),
        ("mechanical keyboard", "Computers & Accessories › Keyboards, Mice & Accessories › Keyboards",
         {"style": ["red switch", "blue switch", "brown switch"]}, (30, 150), ["rgb backlit", "anti ghosting", "hot swappable"]),
        ("screen protector", "Cell Phone Accessories › Screen Protectors", {"style": PHONE_MODELS}, (6, 20),
         ["tempered glass", "bubble free", "case friendly"]),
    ]),
    "fashion": ("Clothing, Shoes & Jewelry", [
        "machine wash", "slim fit", "quick drying", "non slip", "moisture wicking", "elastic waist",
        "polyester spandex", "lace up", "everyday wear", "regular fit"], [
        ("t-shirt", "Men › Clothing › Shirts › T-Shirts", {"size": CLOTHING_SIZES, "color": COLORS}, (8, 30),
         ["short sleeve", "crew neck", "cotton blend"]),
        ("running shoes", "Women › Shoes › Athletic › Running", {"size": SHOE_SIZES, "color": COLORS}, (30, 120),
         ["rubber sole", "breathable mesh", "arch support"]),
        ("hoodie", "Men › Clothing › Fashion Hoodies & Sweatshirts", {"size": CLOTHING_SIZES, "color": COLORS}, (20, 60),
         ["long sleeve", "fleece lined", "kangaroo pocket"]),
        ("jeans", "Women › Clothing › Jeans", {"size": ["24", "26", "28", "30", "32", "34"],
                                              "color": ["light denim", "dark denim", "black", "medium blue", "white"]},
         (20, 70), ["high waist", "stretch denim", "button closure"]),
        ("sandals", "Women › Shoes › Sandals", {"size": SHOE_SIZES, "color": COLORS}, (15, 60),
         ["open toe", "ankle strap", "rubber sole"]),
        ("summer dress", "Women › Clothing › Dresses › Casual", {"size": CLOTHING_SIZES, "color": COLORS}, (18, 50),
         ["v neck", "short sleeve", "flowy"]),
        ("crew socks", "Men › Clothing › Socks", {"size": ["small", "medium", "large"], "color": COLORS}, (8, 25),
         ["cushioned sole", "breathable cotton", "6 pairs"]),
        ("baseball cap", "Men › Accessories › Hats & Caps › Baseball Caps", {"color": COLORS}, (10, 30),
         ["adjustable strap", "sun protection", "cotton twill"]),
        ("leggings", "Women › Clothing › Active › Leggings", {"size": CLOTHING_SIZES, "color": COLORS}, (12, 40),
         ["high waist", "tummy control", "squat proof"]),
        ("rain jacket", "Women › Clothing › Coats, Jackets & Vests › Raincoats", {"size": CLOTHING_SIZES, "color": COLORS},
         (30, 90), ["waterproof", "hooded", "packable"]),
        ("pajama set", "Women › Clothing › Lingerie, Sleep & Lounge › Sleep & Lounge",
         {"size": CLOTHING_SIZES, "color": COLORS}, (15, 45), ["button down", "soft fabric", "long sleeve"]),
        ("winter boots", "Men › Shoes › Boots", {"size": SHOE_SIZES, "color": COLORS}, (40, 140),
         ["faux fur lining", "waterproof", "rubber sole"]),
    ]),
    "food": ("Grocery & Gourmet Food", [
        "gluten free", "non gmo", "low sugar", "keto friendly", "sugar free", "plant based", "ready to eat",
        "individually wrapped", "kosher certified", "dairy free", "soy free"], [
        ("protein bar", "Snacks & Sweets › Nutrition Bars › Protein Bars",
         {"flavor": FLAVORS, "size": ["12 count", "15 count", "24 count"]}, (12, 40), ["high protein", "low carb"]),
        ("coffee beans", "Beverages › Coffee, Tea & Cocoa › Coffee › Whole Coffee Beans",
         {"flavor": ["dark roast", "medium roast", "light roast", "espresso roast", "decaf"],
          "size": ["12 ounce", "1 pound", "2 pound"]}, (8, 35), ["single origin", "fair trade", "organic arabica"]),
        ("green tea", "Beverages › Coffee, Tea & Cocoa › Tea › Green",
         {"flavor": ["jasmine", "matcha", "mint", "lemon", "original"], "size": ["20 count", "40 count", "100 count"]},
         (5, 20), ["antioxidant rich", "tea bags", "loose leaf"]),
        ("potato chips", "Snacks & Sweets › Chips & Crisps › Potato Chips",
         {"flavor": ["sea salt", "barbecue", "sour cream and onion", "salt and vinegar", "jalapeno"],
          "size": ["1 ounce (pack of 24)", "5 ounce (pack of 6)", "8 ounce (pack of 4)"]}, (10, 30),
         ["kettle cooked", "family size"]),
        ("trail mix", "Snacks & Sweets › Nuts & Seeds › Trail Mix", {"flavor": FLAVORS, "size": ["8 ounce", "1 pound", "2 pound"]},
         (8, 30), ["roasted nuts", "dried fruit", "resealable bag"]),
        ("dark chocolate", "Snacks & Sweets › Chocolate › Bars",
         {"flavor": ["sea salt", "orange", "mint", "almond", "raspberry"], "size": ["3 ounce (pack of 4)", "3 ounce (pack of 12)"]},
         (8, 40), ["fair trade", "70 percent cacao"]),
        ("olive oil", "Pantry Staples › Cooking Oils › Olive Oils", {"size": ["16.9 fl oz", "25.3 fl oz", "33.8 fl oz"]},
         (9, 35), ["extra virgin", "cold pressed", "glass bottle"]),
        ("pasta sauce", "Pantry Staples › Sauces, Gravies & Marinades › Pasta Sauces",
         {"flavor": ["marinara", "tomato basil", "arrabbiata", "garlic"], "size": ["24 ounce (pack of 2)", "24 ounce (pack of 6)"]},
         (6, 30), ["no sugar added", "low sodium"]),
        ("beef jerky", "Snacks & Sweets › Jerky & Dried Meats › Jerky",
         {"flavor": ["original", "teriyaki", "black pepper", "sweet and spicy", "smoked"], "size": ["2.5 ounce", "10 ounce"]},
         (8, 40), ["high protein", "grass fed"]),
        ("granola", "Breakfast Foods › Cereals › Granola", {"flavor": FLAVORS, "size": ["11 ounce", "1 pound", "2 pound"]},
         (5, 25), ["whole grain", "low fat", "high fiber"]),
        ("raw honey", "Pantry Staples › Jams, Jellies & Sweet Spreads › Honey", {"size": ["12 ounce", "16 ounce", "32 ounce"]},
         (7, 35), ["unfiltered", "pure natural", "glass jar"]),
        ("hot sauce", "Pantry Staples › Condiments & Salad Dressings › Hot Sauce",
         {"flavor": ["habanero", "jalapeno", "ghost pepper", "chipotle", "original"], "size": ["5 fl oz", "12 fl oz (pack of 2)"]},
         (4, 20), ["small batch", "extra hot"]),
    ]),
    "furniture": ("Home & Kitchen › Furniture", [
        "easy assemble", "living room", "space saving", "storage space", "metal frame", "heavy duty", "non slip",
        "mid century modern", "engineered wood", "easy clean", "bedroom"], [
        ("console table", "Living Room Furniture › Tables › Sofa & Console Tables", {"color": WOOD_COLORS}, (60, 300),
         ["solid wood", "storage shelf", "narrow design"]),
        ("bookshelf", "Home Office Furniture › Bookcases", {"color": WOOD_COLORS, "size": TIERS}, (40, 200),
         ["open shelf", "anti tip", "industrial style"]),
        ("office chair", "Home Office Furniture › Home Office Chairs › Desk Chairs", {"color": FABRIC_COLORS}, (60, 300),
         ["lumbar support", "height adjustable", "swivel base"]),
        ("bar stool", "Game & Recreation Room Furniture › Home Bar Furniture › Barstools",
         {"color": FABRIC_COLORS, "size": ["24 inch", "26 inch", "30 inch"]}, (40, 250), ["set of 2", "footrest", "swivel base"]),
        ("nightstand", "Bedroom Furniture › Nightstands", {"color": WOOD_COLORS}, (30, 150),
         ["drawer storage", "charging station", "solid wood"]),
        ("tv stand", "Living Room Furniture › TV & Media Furniture › Television Stands",
         {"color": WOOD_COLORS, "size": ["55 inch", "65 inch", "70 inch"]}, (80, 350), ["cable management", "open shelf"]),
        ("storage ottoman", "Living Room Furniture › Ottomans", {"color": FABRIC_COLORS}, (30, 150),
         ["faux leather", "foldable", "padded seat"]),
        ("shoe rack", "Entryway Furniture › Shoe Racks", {"size": TIERS, "color": ["black", "white", "bamboo", "grey"]},
         (20, 80), ["stackable", "bamboo wood"]),
        ("coffee table", "Living Room Furniture › Tables › Coffee Tables", {"color": WOOD_COLORS}, (50, 300),
         ["lift top", "solid wood", "hidden compartment"]),
        ("dining chair", "Kitchen & Dining Room Furniture › Chairs", {"color": FABRIC_COLORS}, (50, 250),
         ["set of 4", "upholstered", "wood legs"]),
        ("bed frame", "Bedroom Furniture › Beds, Frames & Bases › Beds", {"size": ["twin", "full", "queen", "king"]},
         (100, 450), ["no box spring needed", "under bed storage", "wood slat support"]),
        ("accent cabinet", "Living Room Furniture › Cabinets, Racks & Shelves › Accent Cabinets", {"color": WOOD_COLORS},
         (70, 320), ["glass doors", "adjustable shelves"]),
    ]),
}

SYLLABLES = ["lu", "mi", "ra", "ko", "ve", "na", "tor", "zen", "sa", "bel", "do", "ri", "an", "el", "qu", "is", "ta",
             "mo", "vi", "ca", "nor", "di", "so", "lin", "ar", "ex", "pu", "ro", "ga", "fe"]
OPENERS = ["i need", "i am looking for", "i want", "find me", "i'm looking for", "i would like", "get me",
           "i want to buy", "looking for"]
EXTRAS = {"beauty": ["for Women and Men", "Gift Set", "for Daily Use", "Salon Quality"],
          "electronics": ["2024 Upgraded", "for Home and Office", "with Warranty", "Compatible with Most Devices"],
          "fashion": ["for Women", "for Men", "Casual Style", "for All Seasons"],
          "food": ["Value Pack", "Family Size", "Snack Pack", "Gourmet Gift"],
          "furniture": ["for Living Room", "for Small Spaces", "Modern Design", "for Home Office"]}
BLURBS = {"beauty": "It is gentle on skin and easy to work into your daily routine.",
          "electronics": "It works out of the box with phones, tablets and laptops.",
          "fashion": "It is comfortable for work, travel and weekends alike.",
          "food": "It makes a tasty snack at home, at work or on the go.",
          "furniture": "It fits small apartments and large living spaces alike."}
REVIEW_TITLES = ["Great value", "Works as described", "Not bad", "Love it", "Would buy again", "Decent quality"]
REVIEW_BODIES = ["Exactly what I was looking for, {t} arrived quickly.", "Good {t} for the price.",
                 "The {t} is fine, but smaller than I expected.", "My second {t} from this brand, still happy."]


def _brand(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _asin(rng: random.Random, used: set[str]) -> str:
    while True:
        asin = "B0" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(8))
        if asin not in used:
            used.add(asin)
            return asin


def _title_case(text: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in text.split())


def _article(phrase: str) -> str:
    return "an " if phrase[:1] in "aeiou" else "a "


def make_product(rng: random.Random, asin: str, category: str, root: str, cat_attrs: list[str], ptype: tuple,
                 brand: str) -> dict:
    name, tail, option_lists, (lo, hi), type_attrs = ptype
    attributes = rng.sample(type_attrs, 2) + rng.sample(cat_attrs, rng.randint(1, 3))
    options = {k: sorted(rng.sample(v, min(len(v), rng.randint(2, 6))), key=v.index) for k, v in option_lists.items()
               if rng.random() < 0.9}
    price = round(rng.uniform(lo, hi), 2)
    pricing = [price] if not options or rng.random() < 0.6 else [price, round(price * rng.uniform(1.1, 1.8), 2)]
    in_title = attributes[:1] + [a for a in attributes[1:] if rng.random() < 0.4]
    title = f"{brand} {_title_case(in_title[0])} {_title_case(name)}"
    if len(in_title) > 1:
        title += ", " + ", ".join(_title_case(a) for a in in_title[1:])
    title += f", {rng.choice(EXTRAS[category])}"
    described = attributes[:]
    rng.shuffle(described)
    description = (f"The {brand} {name} is {', '.join(described[:-1])} and {described[-1]}. {BLURBS[category]}"
                   if len(described) > 1 else f"The {brand} {name} is {described[0]}. {BLURBS[category]}")
    bullets = [f"{a.upper()}: this {name} is {a}." for a in attributes]
    bullets.append(f"WHAT YOU GET: one {name} from {brand}, with our 30-day return promise.")
    reviews = [{"title": rng.choice(REVIEW_TITLES), "score": rng.randint(2, 5),
                "body": rng.choice(REVIEW_BODIES).format(t=name)} for _ in range(rng.randint(0, 2))]
    rating = f"{sum(r['score'] for r in reviews) / len(reviews):.1f}" if reviews else "N.A."
    return {
        "asin": asin, "name": title, "Title": title, "category": category, "query": name,
        "product_category": f"{root} › {tail}", "Description": description, "BulletPoints": bullets,
        "Attributes": attributes, "options": options, "pricing": pricing,
        "Price": f"${pricing[0]}" if len(pricing) == 1 else f"${pricing[0]} to ${pricing[1]}",
        "Rating": rating, "Reviews": reviews,
    }


def _option_phrase(rng: random.Random, goal_options: dict[str, str]) -> str:
    parts = []
    for k, v in goal_options.items():
        form = rng.randrange(3)
        parts.append(f"{v} {k}" if form == 0 else f"{k} {v}" if form == 1 else f"{k}: {v}")
    if not parts:
        return ""
    return rng.choice([" in ", " with ", ", "]) + " and ".join(parts)


def make_goal(rng: random.Random, product: dict, price: float) -> dict:
    attrs = rng.sample(product["Attributes"], rng.randint(1, min(3, len(product["Attributes"]))))
    goal_options = {k: rng.choice(v) for k, v in product["options"].items()}
    price_upper, price_text = price_bound(price, rng)
    ptype = product["query"]
    if rng.random() < 0.6:
        phrase = ", ".join(attrs) + " " + ptype
    else:
        phrase = ptype + " that is " + (" and ".join(attrs) if len(attrs) < 3 else f"{attrs[0]}, {attrs[1]} and {attrs[2]}")
    article = _article(phrase) if not ptype.endswith("s") and rng.random() < 0.8 else ""
    instruction = f"{rng.choice(OPENERS)} {article}{phrase}{_option_phrase(rng, goal_options)}{price_text}"
    return {
        "asin": product["asin"], "category": product["category"], "query": product["query"],
        "name": product["name"], "product_category": product["product_category"], "instruction_text": instruction,
        "attributes": attrs, "price_upper": price_upper, "goal_options": goal_options, "weight": 1,
    }


def generate_catalog(seed: int = 0, num_products: int = 2000) -> tuple[list[dict], dict[str, float], list[dict]]:
    """(products, the price each sells at, one goal per product), all deterministic from the seed."""
    rng = random.Random(f"webshop-catalog-{seed}")
    kinds = [(c, root, attrs, t) for c, (root, attrs, types) in CATALOG.items() for t in types]
    brands = sorted({_brand(rng) for _ in range(max(20, num_products // 15))})
    used: set[str] = set()
    products, prices = [], {}
    for i in range(num_products):
        category, root, cat_attrs, ptype = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        p = make_product(rng, _asin(rng, used), category, root, cat_attrs, ptype, rng.choice(brands))
        products.append(p)
        prices[p["asin"]] = p["pricing"][0] if len(p["pricing"]) == 1 else round(rng.uniform(*p["pricing"]), 2)
    goals = [make_goal(rng, p, prices[p["asin"]]) for p in products]
    return products, prices, goals
