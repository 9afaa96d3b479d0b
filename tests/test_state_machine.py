"""Random command sequences against the pure transitions: the invariants always hold."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from balancesim.actors import (
    AccountState,
    Adjust,
    Confirmed,
    Deposit,
    ForceOption,
    OpenOption,
    PlaceSpotOrder,
    Posted,
    SetControlMode,
    SettleOption,
    Withdraw,
    apply_all,
    decide,
)
from balancesim.money import UNIT

amounts = st.integers(min_value=-3 * UNIT, max_value=500 * UNIT)
assets = st.sampled_from(["USDT", "BTC", "ETH"])


class Account(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = AccountState(1)
        self.entries: list[Posted] = []
        self.now = 0.0

    def run(self, command) -> None:
        verdict = decide(self.state, command, self.now)
        if isinstance(verdict, Confirmed):
            self.state = apply_all(self.state, verdict.events)
            self.entries += [e for e in verdict.events if isinstance(e, Posted)]
        self.now += 1

    @rule(amount=amounts, asset=assets, kind=st.sampled_from([Deposit, Withdraw, Adjust]))
    def money(self, amount, asset, kind):
        self.run(kind(1, amount, asset))

    @rule(amount=amounts, direction=st.sampled_from(["up", "down"]), duration=st.sampled_from([30, 60, 45]))
    def open_option(self, amount, direction, duration):
        self.run(OpenOption(1, "BTCUSDT", direction, amount, duration, UNIT // 10, 100 * UNIT))

    @rule(data=st.data(), exit_price=st.integers(min_value=99, max_value=101))
    def settle(self, data, exit_price):
        ids = sorted(self.state.open_trades) + ["T1-999"]
        self.run(SettleOption(1, data.draw(st.sampled_from(ids)), exit_price * UNIT, self.now))

    @rule(data=st.data(), outcome=st.sampled_from(["win", "lose", "maybe"]))
    def force(self, data, outcome):
        ids = sorted(self.state.open_trades) + ["T1-999"]
        self.run(ForceOption(1, data.draw(st.sampled_from(ids)), outcome, 9))

    @rule(mode=st.sampled_from(["normal", "win", "lose", "bogus"]))
    def control(self, mode):
        self.run(SetControlMode(1, mode, 9))

    @rule(quantity=st.integers(min_value=0, max_value=2 * UNIT), side=st.sampled_from(["buy", "sell"]))
    def spot(self, quantity, side):
        self.run(PlaceSpotOrder(1, "ETHUSDT", side, quantity, 50 * UNIT))

    @invariant()
    def versions_run_one_two_three(self):
        assert [e.version for e in self.entries] == list(range(1, self.state.version + 1))

    @invariant()
    def balances_are_the_sum_of_entries_and_never_negative(self):
        for asset, balance in self.state.balances.items():
            posted = [e for e in self.entries if e.asset == asset]
            assert balance == sum(e.amount for e in posted) >= 0
            assert all(e.balance_after >= 0 for e in posted)

    @invariant()
    def every_open_trade_has_exactly_its_stake(self):
        stakes = {e.metadata["trade_id"] for e in self.entries if e.type == "option_stake"}
        settled = {e.metadata["trade_id"] for e in self.entries if e.type in ("option_payout", "option_refund")}
        assert set(self.state.open_trades) <= stakes
        assert not set(self.state.open_trades) & settled


Account.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestAccount = Account.TestCase
