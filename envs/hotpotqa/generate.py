"""An offline multi-hop world: synthetic countries, cities, people, films, bands and companies with
consistent facts, one page each, and HotpotQA-style questions over them.

Facts agree everywhere they appear (a person's nationality is the demonym of the country of the city they
were born in; a film comes out 25-65 years after its director's birth; ...). A page's first paragraph holds
some facts and later paragraphs the rest, so an agent needs Search and sometimes Lookup, as on Wikipedia.
Questions are bridge ("In what year was the director of X born?") or comparison ("Which was founded first,
A or B?", "Are P and Q both Valdorian?"). Every question is answerable: each needed fact is a sentence that
is either in its page's first paragraph or the first Lookup hit for the hop's keyword (checked here).
Everything is deterministic from the seed.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

from .corpus import Page, make_page, title_key
from .data import Hop, Task

_ONSET = ("val mor ken dra sel tor bri lan cas vel dor rin nar ost el ar win hal ber tam quil zan fen gor lis mar "
          "pel rud sor tev ul wex yar bel cor dun esk fal gil hem").split()
_CODA = "ar en is or ell ane ick ova ley mont wick ard ers ino ula ett ham rin dal ost".split()
_CITY_END = "ton burg mora vik port ford dale grad haven holm field bridge mouth mere".split()
_COUNTRY_END = "ia ania oria eria".split()
_FIRST = {"m": ("Adrian Bruno Caspar Dorian Emil Felix Gregor Hugo Ivo Jonas Kasimir Leon Milo Nils Oskar Pavel "
                "Quentin Rafael Silas Tobias Ulrich Viktor Walter Xavier Yannick Anton Bastian Cyril Dmitri "
                "Elias Florian Gideon Henrik Isak Jasper Konrad Lukas Matthias Nikolai Otto").split(),
          "f": ("Alma Beatrix Clara Delia Elena Freya Greta Hanna Ines Johanna Katya Lena Mara Nadia Olga Petra "
                "Rosa Selma Tessa Ursula Vera Wilma Yara Zora Amelie Bianca Cora Dagny Edith Flora Gisela "
                "Helga Ida Julia Karin Liv Marta Nora Ottilie Paula").split()}
_PRONOUN = {"m": ("He", "he", "his"), "f": ("She", "she", "her")}
_ADJ = ("Silent Crimson Hidden Last Broken Golden Distant Quiet Burning Frozen Wandering Hollow Bright Forgotten "
        "Endless Scarlet Northern Pale Restless Secret Velvet Iron Glass Lonely Wild Tender Fading Open Sleeping "
        "Winter Summer Autumn Stolen Second Narrow Bitter Gentle Lost Twelfth Painted").split()
_NOUN = ("Harbor Garden River Letter Mirror Station Orchard Lantern Bridge Promise Horizon Window Voyage Island "
         "Season Shadow Compass Kingdom Meadow Signal Tide Echo Crown Passage Anthem Circus Frontier Valley Archive "
         "Carnival Lighthouse Forest Ballad Canyon Lagoon Monument Parade Tower Village Highway").split()
_COLOR = "Red Blue Green Black White Silver Amber Violet Grey Copper Indigo Ivory Jade Rust Cobalt Ochre".split()
_ANIMALS = ("Foxes Wolves Ravens Herons Tigers Otters Falcons Lynxes Owls Sparrows Bears Hounds Swans Moths Crows "
            "Stags Vipers Badgers Hares Finches").split()
_ENSEMBLE = "Quartet Orchestra Collective Ensemble Trio Brigade".split()
_COMPANY = {"Industries": "manufacturing", "Systems": "software", "Motors": "automotive", "Foods": "food",
            "Labs": "biotechnology", "Textiles": "textile", "Airways": "aviation", "Pharmaceuticals": "pharmaceutical",
            "Shipping": "shipping", "Energy": "energy", "Publishing": "publishing", "Robotics": "robotics"}
_FILM_GENRES = "drama comedy thriller science-fiction documentary horror romance adventure war musical".split()
_BAND_GENRES = "rock folk jazz punk electronic pop blues metal indie".split()
_PLAYERS = "guitarist singer drummer pianist bassist violinist".split()
_OTHER_JOBS = "novelist painter architect journalist poet photographer".split()

_FILLERS = {
    "person": ["{He} studied at a university in {other_city}.", "{He} is known for a quiet, careful working style.",
               "{He} has received several national awards.", "{He} lives with {his} family near the coast.",
               "{He} has spoken often about {his} early influences."],
    "film": ["The film received mixed reviews from critics.", "It was shot on location over several weeks.",
             "The score was written for a small string ensemble.", "It premiered at a regional film festival.",
             "Critics praised its photography and pacing.", "The screenplay went through several drafts."],
    "company": ["The company employs several thousand people.", "It grew quickly into neighbouring markets.",
                "Its products are sold in many countries.", "It is listed on a national stock exchange."],
    "band": ["They have released several studio albums.", "The group toured widely in its early years.",
             "Their music mixes traditional and modern styles.", "The line-up changed several times."],
}


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _pick_fillers(rng: random.Random, kind: str, n: int, **names) -> list[str]:
    return [s.format(**names) for s in rng.sample(_FILLERS[kind], n)]


@dataclass
class _Entity:
    name: str
    kind: str
    facts: dict = field(default_factory=dict)
    sentences: dict = field(default_factory=dict)  # fact name -> its sentence on the page
    page: Page | None = None


class _World:
    def __init__(self, seed: int, scale: float):
        self.rng = random.Random(f"hotpotqa-world-{seed}")
        self.used: set[str] = set()
        n = lambda base: max(4, int(base * scale))  # noqa: E731
        self.countries = [self._country() for _ in range(14)]
        self.cities = [self._city() for _ in range(n(160))]
        self.people = [self._person(self.rng.choice(_OTHER_JOBS)) for _ in range(n(250))]
        self.directors = [self._person("film director") for _ in range(n(260))]
        self.actors = sorted((self._person("actor") for _ in range(n(320))), key=lambda a: a.facts["year"])
        self._actor_years = [a.facts["year"] for a in self.actors]
        self.founders = [self._person("entrepreneur") for _ in range(n(300))]
        self.musicians = [self._person("musician") for _ in range(n(260))]
        self.films = [self._film() for _ in range(n(700))]
        self.companies = [self._company(f) for f in self.founders]
        self.bands = [self._band(m) for m in self.musicians]
        self.all_people = self.directors + self.actors + self.founders + self.musicians + self.people
        for person in self.all_people:
            self._person_page(person)
        # indexes that let questions pick "same" / "different" pairs without scanning everything
        self.people_by_country = _group(self.all_people, lambda p: p.facts["country"].name)
        self.companies_by_country = _group(self.companies, lambda c: c.facts["country"].name)
        self.films_by_director = _group(self.films, lambda f: f.facts["director"].name)
        for film in self.films:
            self._film_page(film)
        for country in self.countries:
            cities = [c.name for c in self.cities if c.facts["country"] is country][:3]
            sentences = [f"{country.name} is a country.", f"People from {country.name} are called "
                         f"{country.facts['demonym']}s."]
            if cities:
                sentences.append(f"Its cities include {', '.join(cities)}.")
            country.page = make_page(country.name, [sentences])

    def _name(self, make) -> str:
        for _ in range(10_000):
            name = make()
            if title_key(name) not in self.used:
                self.used.add(title_key(name))
                return name
        raise RuntimeError("the name space of the generated world is exhausted; lower num_tasks")

    def _word(self) -> str:
        rng = self.rng
        parts = [rng.choice(_ONSET)] + ([rng.choice(_ONSET)] if rng.random() < 0.3 else []) + [rng.choice(_CODA)]
        return "".join(parts).capitalize()

    def _country(self) -> _Entity:
        name = self._name(lambda: (self.rng.choice(_ONSET) + self.rng.choice(_ONSET)).capitalize()
                          + self.rng.choice(_COUNTRY_END))
        return _Entity(name, "country", {"demonym": name + "n"})

    def _city(self) -> _Entity:
        rng = self.rng
        name = self._name(lambda: (rng.choice(_ONSET) + rng.choice(_CITY_END)).capitalize()
                          if rng.random() < 0.6 else self._word() + rng.choice(_CITY_END))
        country = rng.choice(self.countries)
        city = _Entity(name, "city", {"country": country, "year": rng.randint(800, 1880)})
        river = (rng.choice(_ONSET) + rng.choice("a e in el".split())).capitalize()
        city.page = make_page(name, [
            [f"{name} is a city in {country.name}.", f"It was founded in {city.facts['year']}.",
             f"It has a population of about {rng.randint(8, 900) * 1000:,} people."],
            [f"The city lies on the {river} river.", "It is known for its old market square."]])
        return city

    def _person(self, job: str) -> _Entity:
        rng = self.rng
        gender = rng.choice("mf")
        name = self._name(lambda: f"{rng.choice(_FIRST[gender])} {self._word()}")
        city = rng.choice(self.cities)
        occupation = {"actor": "actor" if gender == "m" else "actress",
                      "entrepreneur": "businessman" if gender == "m" else "businesswoman",
                      "musician": rng.choice(["musician", "singer", "songwriter"])}.get(job, job)
        return _Entity(name, "person", {"gender": gender, "year": rng.randint(1900, 1985), "city": city, "job": job,
                                        "country": city.facts["country"], "occupation": occupation, "works": []})

    def _film(self) -> _Entity:
        rng = self.rng
        name = self._name(lambda: rng.choice([
            lambda: f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)}",
            lambda: f"{rng.choice(_NOUN)} of {rng.choice(self.cities).name}",
            lambda: f"{_a(rng.choice(_NOUN)).replace('a', 'A', 1)} for {rng.choice(_FIRST[rng.choice('mf')])}",
            lambda: f"{rng.choice(_ADJ)} {rng.choice(_NOUN)}s"])())
        director = rng.choice(self.directors)
        year = min(2023, director.facts["year"] + rng.randint(25, 65))
        lo, hi = bisect.bisect_left(self._actor_years, year - 70), bisect.bisect_right(self._actor_years, year - 18)
        star = self.actors[rng.randrange(lo, hi)] if hi > lo else rng.choice(self.actors)
        film = _Entity(name, "film", {"year": year, "director": director, "star": star,
                                      "genre": rng.choice(_FILM_GENRES), "country": director.facts["country"]})
        director.facts["works"].append(name)
        star.facts["works"].append(name)
        return film

    def _company(self, founder: _Entity) -> _Entity:
        rng = self.rng
        suffix = rng.choice(list(_COMPANY))
        name = self._name(lambda: f"{self._word()} {suffix}")
        city = rng.choice(self.cities)
        year = min(2023, founder.facts["year"] + rng.randint(20, 55))
        company = _Entity(name, "company", {"year": year, "founder": founder, "city": city,
                                            "country": city.facts["country"], "industry": _COMPANY[suffix]})
        founder.facts["works"].append(name)
        country = company.facts["country"]
        intro = f"{name} is {_a(country.facts['demonym'])} {company.facts['industry']} company."
        founded = company.sentences["founded"] = f"The company was founded in {year} by {founder.name}."
        hq = company.sentences["hq"] = f"It is headquartered in {city.name}, {country.name}."
        company.page = self._layout(name, intro, [founded, hq], _pick_fillers(rng, "company", 3))
        return company

    def _band(self, founder: _Entity) -> _Entity:
        rng = self.rng
        name = self._name(lambda: rng.choice([
            lambda: f"The {rng.choice(_COLOR)} {rng.choice(_ANIMALS)}",
            lambda: f"{rng.choice(_ADJ)} {rng.choice(_ANIMALS)}",
            lambda: f"The {self._word()} {rng.choice(_ENSEMBLE)}"])())
        city = founder.facts["city"] if rng.random() < 0.5 else rng.choice(self.cities)
        year = min(2023, founder.facts["year"] + rng.randint(16, 35))
        band = _Entity(name, "band", {"year": year, "founder": founder, "city": city,
                                      "country": city.facts["country"], "genre": rng.choice(_BAND_GENRES)})
        founder.facts["works"].append(name)
        country = band.facts["country"]
        intro = f"{name} is {_a(country.facts['demonym'])} {band.facts['genre']} band."
        formed = band.sentences["formed"] = f"The band was formed in {city.name}, {country.name}, in {year}."
        by = band.sentences["founder"] = f"It was founded by the {rng.choice(_PLAYERS)} {founder.name}."
        band.page = self._layout(name, intro, [formed, by], _pick_fillers(rng, "band", 3))
        return band

    def _person_page(self, person: _Entity) -> None:
        f = person.facts
        he, _, his = _PRONOUN[f["gender"]]
        country = f["country"]
        intro = person.sentences["intro"] = (f"{person.name} is {_a(country.facts['demonym'])} "
                                             f"{f['occupation']}.")
        born = person.sentences["born"] = f"{he} was born in {f['year']} in {f['city'].name}, {country.name}."
        works = f["works"]
        facts = [born]
        if works:
            listed = works[0] if len(works) == 1 else ", ".join(works[:-1][:3]) + " and " + works[-1]
            facts.append({"entrepreneur": f"{he} founded {listed}.", "musician": f"{he} founded the band {listed}."}
                         .get(f["job"], f"{his.capitalize()} best-known film{'s include' if len(works) > 1 else ' is'}"
                                        f" {listed}."))
        fillers = _pick_fillers(self.rng, "person", 2, He=he, his=his, other_city=self.rng.choice(self.cities).name)
        person.page = self._layout(person.name, intro, facts, fillers)

    def _film_page(self, film: _Entity) -> None:
        f = film.facts
        intro = film.sentences["intro"] = (f"{film.name} is {_a(str(f['year']))} {f['country'].facts['demonym']} "
                                           f"{f['genre']} film.")
        directed = film.sentences["directed"] = f"It was directed by {f['director'].name}."
        stars = film.sentences["stars"] = f"It stars {f['star'].name} in the lead role."
        film.page = self._layout(film.name, intro, [directed, stars], _pick_fillers(self.rng, "film", 3))

    def _layout(self, title: str, intro: str, facts: list[str], fillers: list[str]) -> Page:
        """First paragraph: the intro, each fact with probability 0.4, a filler; the rest later, shuffled."""
        rng = self.rng
        first = [intro] + [s for s in facts if rng.random() < 0.4]
        later = [s for s in facts if s not in first] + fillers[1:]
        rng.shuffle(later)
        paragraphs = [first + fillers[:1]]
        if later:
            cut = max(1, len(later) // 2)
            paragraphs += [later[:cut], later[cut:]] if len(later) > 2 else [later]
        return make_page(title, paragraphs)

    def pages(self) -> list[Page]:
        groups = [self.countries, self.cities, self.people, self.directors, self.actors, self.founders,
                  self.musicians, self.films, self.companies, self.bands]
        return [e.page for group in groups for e in group]


# --- questions -----------------------------------------------------------------------------------------------

def _hop(entity: _Entity, sentence: str, keyword: str, fact: str, goal: str, aim: str) -> Hop:
    return Hop(title=entity.name, evidence=entity.sentences[sentence], keyword=keyword, fact=fact, goal=goal, aim=aim)


def _group(items: list, key) -> dict[str, list]:
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _other(rng: random.Random, pool: list, not_this, accept, tries: int = 50):
    """A random member of pool other than `not_this` that `accept`s, or None (rejection sampling)."""
    for _ in range(tries):
        pick = rng.choice(pool)
        if pick is not not_this and accept(pick):
            return pick
    return None


def _readable(hop: Hop, page: Page) -> bool:
    """The fact can be read: shown by Search, or the first hit of Lookup[keyword]."""
    hits = page.lookup(hop.keyword)
    return hop.evidence in page.first_paragraph() or (bool(hits) and hits[0] == hop.evidence)


def _bridge(w: _World, rng: random.Random):
    link = rng.choice(["director", "director", "star", "company", "band"])
    if link in ("director", "star"):
        film = rng.choice(w.films)
        person = film.facts[link]
        if link == "director":
            role, short = f"the director of {film.name}", "the director"
            first = _hop(film, "directed", "directed", f"{film.name} was directed by {person.name}",
                         f"who directed {film.name}", "who directed it")
        else:
            role, short = f"the lead actor of {film.name}", "the lead actor"
            first = _hop(film, "stars", "stars", f"{film.name} stars {person.name}",
                         f"who stars in {film.name}", "who stars in it")
    elif link == "company":
        company = rng.choice(w.companies)
        person = company.facts["founder"]
        role, short = f"the founder of {company.name}", "the founder"
        first = _hop(company, "founded", "founded", f"{company.name} was founded by {person.name}",
                     f"who founded {company.name}", "who founded it")
    else:
        band = rng.choice(w.bands)
        person = band.facts["founder"]
        role, short = f"the founder of the band {band.name}", "the founder"
        first = _hop(band, "founder", "founded", f"{band.name} was founded by {person.name}",
                     f"who founded {band.name}", "who founded it")
    f = person.facts
    _, he, his = _PRONOUN[f["gender"]]
    attr = rng.choice(["year", "year", "city", "country", "nationality"])
    if attr == "nationality":
        demonym = f["country"].facts["demonym"]
        second = _hop(person, "intro", demonym, f"{person.name} is {_a(demonym)} {f['occupation']}",
                      f"the nationality of {short}", f"{his} nationality")
        answer = demonym
        questions = [f"What nationality is {role}?", f"What is the nationality of {role}?"]
        conclusions = [f"{person.name} is {demonym}, so the answer is {demonym}.",
                       f"So {role} is {demonym}."]
    else:
        value = {"year": str(f["year"]), "city": f["city"].name, "country": f["country"].name}[attr]
        said = {"year": f"born in {f['year']}", "city": f"born in {f['city'].name}",
                "country": f"born in {f['country'].name}"}[attr]
        second = _hop(person, "born", "born", f"{person.name} was {said}",
                      {"year": f"the birth year of {short}", "city": f"the city where {short} was born",
                       "country": f"the country where {short} was born"}[attr],
                      {"year": f"{his} birth year", "city": f"where {he} was born",
                       "country": f"which country {he} was born in"}[attr])
        answer = value
        questions = {"year": [f"What is the birth year of {role}?", f"In what year was {role} born?",
                              f"{role[0].upper() + role[1:]} was born in which year?"],
                     "city": [f"In which city was {role} born?", f"What is the birthplace city of {role}?"],
                     "country": [f"In which country was {role} born?", f"{role[0].upper() + role[1:]} was born "
                                                                        f"in which country?"]}[attr]
        conclusions = [f"{person.name} was {said}, so the answer is {value}.",
                       f"So {role}, {person.name}, was {said}. The answer is {value}."]
    return rng.choice(questions), answer, "bridge", [first, second], conclusions


def _comparison(w: _World, rng: random.Random):
    kind = rng.choice(["founded", "formed", "born", "released", "nationality", "director", "hq"])
    if kind in ("founded", "formed", "born", "released"):
        pool, sentence, keyword, verb = {
            "founded": (w.companies, "founded", "founded", "founded"),
            "formed": (w.bands, "formed", "formed", "formed"),
            "born": (w.all_people, "born", "born", "born"),
            "released": (w.films, "intro", None, "released")}[kind]
        a, b = rng.sample(pool, 2)
        if a.facts["year"] == b.facts["year"]:
            return None
        subject = (lambda e: _PRONOUN[e.facts["gender"]][1]) if kind == "born" else (lambda e: "it")
        hops = [_hop(e, sentence, keyword or str(e.facts["year"]), f"{e.name} was {verb} in {e.facts['year']}",
                     f"when {e.name} was {verb}", f"when {subject(e)} was {verb}") for e in (a, b)]
        first, last = sorted((a, b), key=lambda e: e.facts["year"])
        answer = first.name
        questions = {"founded": [f"Which was founded first, {a.name} or {b.name}?",
                                 f"Which company is older, {a.name} or {b.name}?"],
                     "formed": [f"Which band was formed first, {a.name} or {b.name}?",
                                f"Which band is older, {a.name} or {b.name}?"],
                     "born": [f"Who was born first, {a.name} or {b.name}?", f"Who is older, {a.name} or {b.name}?"],
                     "released": [f"Which film was released first, {a.name} or {b.name}?",
                                  f"Which film came out earlier, {a.name} or {b.name}?"]}[kind]
        conclusions = [f"{a.name} was {verb} in {a.facts['year']} and {b.name} in {b.facts['year']}, so "
                       f"{first.name} was {verb} first.",
                       f"{first.name} ({first.facts['year']}) comes before {last.name} ({last.facts['year']}). "
                       f"So the answer is {first.name}."]
        return rng.choice(questions), answer, "comparison", hops, conclusions
    if kind == "nationality":
        a = rng.choice(w.all_people)
        same = rng.random() < 0.5
        b = _other(rng, w.people_by_country[a.facts["country"].name] if same else w.all_people, a,
                   lambda p: (p.facts["country"] is a.facts["country"]) == same)
        if b is None:
            return None
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        dem = {e.name: e.facts["country"].facts["demonym"] for e in (a, b)}
        hops = [_hop(e, "intro", dem[e.name], f"{e.name} is {dem[e.name]}", f"the nationality of {e.name}",
                     f"{_PRONOUN[e.facts['gender']][2]} nationality") for e in (a, b)]
        answer = "yes" if same else "no"
        questions = [f"Are {a.name} and {b.name} both {dem[a.name]}?", f"Are {a.name} and {b.name} of the same "
                                                                       f"nationality?"]
        conclusions = ([f"{a.name} and {b.name} are both {dem[a.name]}, so the answer is yes."] if same else
                       [f"{a.name} is {dem[a.name]} but {b.name} is {dem[b.name]}, so the answer is no."])
        return rng.choice(questions), answer, "comparison", hops, conclusions
    if kind == "director":
        a = rng.choice(w.films)
        same = rng.random() < 0.5
        b = _other(rng, w.films_by_director[a.facts["director"].name] if same else w.films, a,
                   lambda f: (f.facts["director"] is a.facts["director"]) == same)
        if b is None:
            return None
        hops = [_hop(e, "directed", "directed", f"{e.name} was directed by {e.facts['director'].name}",
                     f"who directed {e.name}", "who directed it") for e in (a, b)]
        answer = "yes" if same else "no"
        questions = [f"Were {a.name} and {b.name} directed by the same person?",
                     f"Do the films {a.name} and {b.name} have the same director?"]
        conclusions = ([f"Both films were directed by {a.facts['director'].name}, so the answer is yes."] if same else
                       [f"{a.name} was directed by {a.facts['director'].name} and {b.name} by "
                        f"{b.facts['director'].name}, so the answer is no."])
        return rng.choice(questions), answer, "comparison", hops, conclusions
    a = rng.choice(w.companies)  # hq: half the pairs share a's country
    b = _other(rng, w.companies_by_country[a.facts["country"].name] if rng.random() < 0.5 else w.companies, a,
               lambda c: True)
    if b is None:
        return None
    a, b = (a, b) if rng.random() < 0.5 else (b, a)
    country = a.facts["country"] if rng.random() < 0.5 else b.facts["country"]
    same = a.facts["country"] is b.facts["country"] is country
    hops = [_hop(e, "hq", "headquartered", f"{e.name} is headquartered in {e.facts['city'].name}, "
                 f"{e.facts['country'].name}", f"where {e.name} is headquartered", "where it is headquartered")
            for e in (a, b)]
    answer = "yes" if same else "no"
    questions = [f"Are {a.name} and {b.name} both headquartered in {country.name}?",
                 f"Are the companies {a.name} and {b.name} both based in {country.name}?"]
    conclusions = [f"{a.name} is in {a.facts['country'].name} and {b.name} is in {b.facts['country'].name}, so "
                   f"the answer is {answer}."]
    return rng.choice(questions), answer, "comparison", hops, conclusions


def generate(seed: int, num_tasks: int) -> tuple[list[Page], list[Task]]:
    """(pages, tasks) of the world for this seed; about 60% bridge and 40% comparison questions."""
    world = _World(seed, scale=max(1.0, num_tasks / 3000))
    pages = world.pages()
    by_title = {p.title: p for p in pages}
    rng = random.Random(f"hotpotqa-questions-{seed}")
    tasks, seen = [], set()
    for _ in range(num_tasks * 50):
        if len(tasks) >= num_tasks:
            break
        made = (_bridge if rng.random() < 0.6 else _comparison)(world, rng)
        if made is None or made[0] in seen:
            continue
        question, answer, kind, hops, conclusions = made
        if not all(_readable(h, by_title[h.title]) for h in hops):
            continue
        seen.add(question)
        tasks.append(Task(id=f"gen{seed}-{len(tasks):05d}", question=question, answer=answer, kind=kind,
                          hops=hops, conclusions=conclusions))
    if len(tasks) < num_tasks:
        raise RuntimeError(f"generated only {len(tasks)} distinct questions of the {num_tasks} asked")
    return pages, tasks
