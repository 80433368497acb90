"""The WebShop environment: a text shop over WebShop's 1,000-product set, with scripted experts.

Data. Products are read from ``<data_dir>/webshop/products_1k.jsonl`` (one product a line,
already cleaned: title, description, feature bullets, price list, options, attributes,
category path and the search term it was listed under). ``items_ins_v2_1000.json`` gives
415 of these products a synthetic ``instruction`` with its ``instruction_attributes``: they
are the goal products. A product sells at the lower end of its listed price (WebShop draws a
price inside a range at random; a fixed price keeps episodes reproducible).

Goals, as WebShop builds its synthetic goals. Every combination of a goal product's option
values is a goal, with a price bound drawn from the next price steps above the product's price
(two of the next four multiples of $10, the larger kept; $1,000,000 when fewer than two
exist). Its text is ``"<instruction> with <name: value, and name: value>, and price lower
than <bound> dollars"``. To keep products with hundreds of combinations from swamping the
others, each product keeps at most :data:`GOALS_PER_PRODUCT` of its combinations (all of them
when it has fewer, else a sample fixed by the product's ASIN). A task's id is
``<split>-<asin>-<combination index>``; its ``kind`` is the product's shop category
(``beauty``, ``electronics``, ``fashion``, ``garden`` or ``grocery``).

Split. The 415 goal products are shuffled with seed :data:`SPLIT_SEED`; the first 83 (20%)
are ``test``, the other 332 ``train``, so test goals ask for products never seen in training.
With the per-product cap this gives 1,423 train goals and 336 test goals (most of them
``fashion``, whose products have the most option combinations).

Protocol (WebShop's action syntax). Each reply holds one action, ``search[query]`` (only on
the search page) or ``click[label]`` with the label of a bracketed button on the current page
(case and surrounding spaces ignored); text before a final ``Action:`` is allowed, so ReAct
replies work. Pages are WebShop's: the search page (the instruction and ``[Search]``); a
results page (10 products a page, at most 50, ``[Next >]`` / ``[< Prev]`` to page,
``[Back to Search]``, each product's ``[ASIN]``, title and price); an item page (options as
``[value]`` buttons under their names, title, price, ``[Description]``, ``[Features]``,
``[Buy Now]``, ``[< Prev]`` back to the results); and description / features pages (``[< Prev]``
back to the item). Elements are separated by ``[SEP]``. Search is BM25 (``bm25s``, English
stopwords) over each product's indexed text (the data's ``contents``: title, description and
features, lower-cased, as WebShop indexed them) plus its category path and listing search term;
products sharing no word with the query are not listed. The index is built once per product
set and shared by every env over it. A malformed action, a click on something not on the
page, or a search away from the search page is answered with what was wrong and the page's
buttons, marked ``info["invalid"]``, and costs a step. ``[Buy Now]`` ends the episode; ``max_steps`` actions
without buying truncate it.

Scoring (WebShop's reward, Yao et al. 2022). For the bought product y and goal u,
``r = r_type * (attribute matches + option matches + [price <= bound]) / (|attributes| +
|options| + 1)``. A goal attribute matches when one of y's attributes is a fuzzy match
(rapidfuzz token-set ratio above 85) or it occurs in y's title, features or description; a
goal option matches when a chosen option value is such a fuzzy match, or for a size (on
either side) the same value, as WebShop matches sizes exactly (fuzzily, "large" would pass
for "x-large" and a 12-pack for a single pack). ``r_type`` is 1 when y has the goal's listing
search term, shares two category levels, or more than 20% of the goal title's content words;
0.5 otherwise; 0.1 when under 10% of those words are shared; 0 when none is. WebShop counts
spaCy-tagged nouns of the titles; here every title word of three or more letters that is not a
stopword counts, which needs no tagger model. Success is reward 1.0.

Experts. :func:`expert_actions` searches the goal's whole text, pages to the goal product,
opens it, clicks each goal option and buys; :func:`build_webshop_experts` replays that through
:class:`WebShopEnv` and keeps the successes.
"""

from agentloop.envs.registry import EnvDefinition, Imagination
from agentloop.envs.webshop.catalog import SPLITS, WebShopTask, load_webshop_tasks
from agentloop.envs.webshop.config import WebShopEnvConfig
from agentloop.envs.webshop.env import WebShopEnv
from agentloop.envs.webshop.experts import build_webshop_experts
from agentloop.envs.webshop.imagine import imagined_task, judge_evidence, proposal_prompt

ENV = EnvDefinition(
    name="webshop",
    splits=SPLITS,
    train_split="train",
    eval_split="test",
    load_tasks=load_webshop_tasks,
    env=WebShopEnv,
    config=WebShopEnvConfig,
    build_experts=build_webshop_experts,
    context_tokens=4096,
    median_episode_tokens=1145,  # bench/episode_tokens.py: median of 200 train experts
    imagination=Imagination(prompt=proposal_prompt, build=imagined_task, evidence=judge_evidence),
)
"""The WebShop environment's registration (``agentloop.envs``)."""

__all__ = ["ENV", "WebShopEnv", "WebShopEnvConfig", "WebShopTask", "build_webshop_experts", "load_webshop_tasks"]
