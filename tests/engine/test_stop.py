"""Stop strings over streamed deltas: cut at the first stop, never released partly, minimal holdback."""

from corral.engine.stop import StopStringMatcher


def feed(stops, deltas):
    m = StopStringMatcher(stops)
    out, hit = [], False
    for d in deltas:
        text, hit = m.push(d)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    return out, hit


def test_stop_spanning_deltas_is_cut_and_never_released():
    out, hit = feed(["<|end|>"], ["Hello", " wor", "ld<|e", "nd", "|>", "more"])
    assert hit and "".join(out) == "Hello world"
    assert out == ["Hello", " wor", "ld", "", ""]  # "<|e" and "nd" were held back, then dropped


def test_earliest_of_several_stops_wins():
    out, hit = feed(["b c", "a b"], ["xa", " b c"])
    assert hit and "".join(out) == "x"


def test_false_start_is_released():
    out, hit = feed(["STOP"], ["ST", "ART and ST", "OPPED"])
    assert hit and "".join(out) == "START and "
    out, hit = feed(["STOP"], ["ST", "ART", " ST"])
    assert not hit and "".join(out) == "START ST" and out[-1] == "ST"  # held back, flushed at the end


def test_no_stops_passes_through():
    assert feed([], ["a", "b"]) == (["a", "b", ""], False)


def test_stop_inside_one_delta():
    out, hit = feed(["\n\n"], ["one\n\ntwo"])
    assert hit and out == ["one"]
