// loadgen replays prepared sensor readings into Kafka at a fixed rate, stamping each with the
// wall-clock time at send, so that latency benchmarks measure the worker rather than a Python
// load generator competing with it for the same cores.
//
// Input: one reading per line, "PARTITION<TAB>KEY<TAB>JSON", where JSON holds the placeholder
// 9999999999999 for the timestamp. The first --warmup seconds of the stream let the producer,
// the broker and the consumer reach a steady state; latency is measured on what follows. Output
// on stdout: one JSON line with the achieved rate and when the measured part began (Unix ms).
//
// With --events-topic it also reads the worker's events as an alert consumer would, from the
// start of that topic, until a second line arrives on stdin; then it prints a second JSON line:
// for every event, its window end and the time from window end to arrival (ms). Reading them
// here costs the machine far less than a Python consumer would.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

var placeholder = []byte("9999999999999")

type reading struct {
	partition int32
	key       []byte
	value     []byte
	at        int // index of the placeholder in value
}

func load(path string) ([]reading, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	var out []reading
	scanner := bufio.NewScanner(file)
	scanner.Buffer(make([]byte, 1<<20), 1<<24)
	for scanner.Scan() {
		parts := strings.SplitN(scanner.Text(), "\t", 3)
		if len(parts) != 3 {
			return nil, fmt.Errorf("%s: line %d is not PARTITION<TAB>KEY<TAB>JSON", path, len(out)+1)
		}
		partition, err := strconv.Atoi(parts[0])
		if err != nil {
			return nil, fmt.Errorf("%s: line %d: %v", path, len(out)+1, err)
		}
		value := []byte(parts[2])
		at := bytes.Index(value, placeholder)
		if at < 0 {
			return nil, fmt.Errorf("%s: line %d has no timestamp placeholder", path, len(out)+1)
		}
		out = append(out, reading{int32(partition), []byte(parts[1]), value, at})
	}
	return out, scanner.Err()
}

func main() {
	brokers := flag.String("bootstrap-servers", "127.0.0.1:9092", "Kafka bootstrap servers")
	topic := flag.String("topic", "", "topic to produce to")
	input := flag.String("input", "", "prepared readings")
	rate := flag.Float64("rate", 1000, "readings per second")
	seconds := flag.Float64("seconds", 10, "stop after this long (after the warm-up)")
	warmup := flag.Float64("warmup", 0, "seconds of stream before the measured part")
	eventsTopic := flag.String("events-topic", "", "also time the events arriving on this topic")
	flag.Parse()

	readings, err := load(*input)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}
	client, err := kgo.NewClient(
		kgo.SeedBrokers(strings.Split(*brokers, ",")...),
		kgo.DefaultProduceTopic(*topic),
		kgo.RecordPartitioner(kgo.ManualPartitioner()),
		kgo.ProducerLinger(2*time.Millisecond),
		kgo.ProducerBatchCompression(kgo.NoCompression()),
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}
	defer client.Close()
	ctx := context.Background()
	if err := client.Ping(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}
	var arrivals chan timing
	stopEvents := make(chan struct{})
	if *eventsTopic != "" {
		arrivals, err = timeEvents(ctx, *brokers, *eventsTopic, stopEvents)
		if err != nil {
			fmt.Fprintln(os.Stderr, "loadgen:", err)
			os.Exit(2)
		}
	}
	fmt.Fprintln(os.Stderr, "ready")
	stdin := bufio.NewReader(os.Stdin)
	stdin.ReadString('\n') // go: a line on stdin

	interval := time.Duration(float64(time.Second) / *rate)
	started := time.Now()
	measured := started.Add(time.Duration(*warmup * float64(time.Second)))
	deadline := measured.Add(time.Duration(*seconds * float64(time.Second)))
	sent := 0
	last := map[string]int64{}
	var failed atomic.Int64
	for i := range readings {
		due := started.Add(time.Duration(i) * interval)
		if wait := time.Until(due); wait > 0 {
			time.Sleep(wait)
		}
		now := time.Now()
		if now.After(deadline) {
			break
		}
		r := readings[i]
		// Readings of one key are a time series: never two with the same millisecond.
		stamp := now.UnixMilli()
		if previous, ok := last[string(r.key)]; ok && stamp <= previous {
			stamp = previous + 1
		}
		last[string(r.key)] = stamp
		value := make([]byte, len(r.value))
		copy(value, r.value)
		copy(value[r.at:], strconv.FormatInt(stamp, 10))
		client.Produce(ctx, &kgo.Record{Key: r.key, Value: value, Partition: r.partition},
			func(_ *kgo.Record, err error) {
				if err != nil {
					failed.Add(1)
				}
			})
		sent++
	}
	if err := client.Flush(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
	elapsed := time.Since(started).Seconds()
	summary, _ := json.Marshal(map[string]any{
		"sent": sent, "failed": failed.Load(), "seconds": elapsed, "achieved_rate": float64(sent) / elapsed,
		"measured_from_ms": measured.UnixMilli(),
	})
	fmt.Println(string(summary))
	if failed.Load() > 0 {
		os.Exit(1)
	}
	if arrivals != nil {
		stdin.ReadString('\n') // stop: a second line on stdin
		close(stopEvents)
		timed, _ := json.Marshal(<-arrivals)
		fmt.Println(string(timed))
	}
}

// timing: for every event, [window end, arrival minus window end] in ms (an event's "time" is its
// window's end), and how many events could not be read.
type timing struct {
	Arrivals   [][2]float64 `json:"arrivals"`
	Unreadable int          `json:"unreadable"`
}

// timeEvents consumes `topic` from its start until `stop` closes, and then sends the timing.
func timeEvents(ctx context.Context, brokers, topic string, stop chan struct{}) (chan timing, error) {
	consumer, err := kgo.NewClient(
		kgo.SeedBrokers(strings.Split(brokers, ",")...),
		kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchMaxWait(10*time.Millisecond),
	)
	if err != nil {
		return nil, err
	}
	if err := consumer.Ping(ctx); err != nil {
		return nil, err
	}
	done := make(chan timing, 1)
	pollCtx, cancel := context.WithCancel(ctx)
	go func() {
		<-stop
		cancel()
	}()
	go func() {
		defer consumer.Close()
		var out timing
		var event struct {
			Time string `json:"time"`
		}
		for pollCtx.Err() == nil {
			fetches := consumer.PollFetches(pollCtx)
			now := float64(time.Now().UnixMicro()) / 1000
			fetches.EachRecord(func(r *kgo.Record) {
				if json.Unmarshal(r.Value, &event) != nil {
					out.Unreadable++
					return
				}
				end, err := time.Parse(time.RFC3339Nano, event.Time)
				if err != nil {
					out.Unreadable++
					return
				}
				endMs := float64(end.UnixMicro()) / 1000
				out.Arrivals = append(out.Arrivals, [2]float64{endMs, now - endMs})
			})
		}
		done <- out
	}()
	return done, nil
}
